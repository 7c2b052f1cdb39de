"""The governor: production stays ahead of playback without tuning. `law` is the control
law (pure), `worker` measures, decides and records, `report` says what it did for
`dreamd status` and the dashboard."""
