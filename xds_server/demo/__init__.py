"""`hybridlb demo`: simulated GPUs, the control plane and real Envoys on one machine."""
