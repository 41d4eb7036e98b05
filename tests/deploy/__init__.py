"""Deployment tests (docker/, Kubernetes manifests, a real Prometheus); helpers in _deploy."""
