"""`make bench`: each module measures one target against its baseline in the same process (no Qt here)."""
