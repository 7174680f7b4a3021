"""Great Expectations suites, one builder per table, stored as JSON beside the code."""
