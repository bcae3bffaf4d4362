"""Helpers shared by the test tiers: servers and polling, the sandboxes' business, Sage fixtures."""
