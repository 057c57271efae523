"""The orchestrator: builds one run's state (run.py), drives capture -> calibrators ->
graphs/artifacts (calibrate.py) and reports it (report.py)."""
