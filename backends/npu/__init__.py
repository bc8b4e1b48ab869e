"""The npu lowerings (added by a later change); registers nothing yet."""

BACKENDS = ()
