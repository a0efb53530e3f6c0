"""Tandem's simulator and planner (issue 17): a cost model fitted on this host (`tandem profile`),
a discrete-event simulator running the router's own policies on simulated instances
(`tandem simulate`), and a search over cluster shapes for goodput under SLOs (`tandem plan`).

- costmodel.py  cost model, profile file, least-squares fits
- clock.py      virtual clock / event loop
- request.py    a simulated request (the engine's two counters)
- instance.py   a simulated instance (the engine scheduler's batching rules, fast-forwarded decodes)
- router.py     the simulated router (imports router.request.placement, router.cluster.role_policy,
                router.migration.policy)
- simulator.py  one run: shape + profile + workload → per-request results
- report.py     loadgen-format reports
- profile.py    measuring the engine (`tandem profile`)
- planner.py    the search (`tandem plan`) and Helm values
- cli.py        the three commands
"""
