"""The cuda lowerings (added by a later change); registers nothing yet."""

BACKENDS = ()
