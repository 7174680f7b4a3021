"""The revisions of the event-log database, oldest first: 0001 (events), 0002 (exposures), 0003 (experiments)."""
