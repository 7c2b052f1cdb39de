"""Storage: everything the daemon writes under the data dir (atomic writes, paths
relative to the data dir, retention and the budget, reconcile at start). Workers,
the display and the memory look down at it; it imports none of them."""
