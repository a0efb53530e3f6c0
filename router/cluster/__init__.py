"""What the router knows of the cluster: the instance registry, the leader lock, the prefix index, instance roles."""
