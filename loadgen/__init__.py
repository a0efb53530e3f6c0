"""Tandem's load generator: workloads, arrival processes, targets, an open-loop runner, metrics, reports."""
