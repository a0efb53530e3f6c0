"""Router: front door, placement, rescheduler, instance registry, predictor, autoscaler."""
