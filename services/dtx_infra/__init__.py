"""Test and development infrastructure for dtx (local processes, Kubernetes control plane)."""
