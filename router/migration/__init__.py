"""Live migration between decode instances: the policy, the rescheduler loop, its flags."""
