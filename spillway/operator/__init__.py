"""The Spillway operator: InferenceTenant reconcile, placement, reservations and SLO feedback."""
