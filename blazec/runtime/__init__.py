"""Runtime helpers: sample load balancing and multi-task gradient balancing."""
