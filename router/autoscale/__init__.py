"""Scaling the prefill and decode pools: policy, controller loop, drain, the Kubernetes scale API."""
