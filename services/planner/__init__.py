"""The SLO planner: filled by a later issue (forecasting and scaling workers)."""
