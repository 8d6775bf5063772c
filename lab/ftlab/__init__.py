"""The lab: a small cluster of namespace "hosts" on one machine, the test bed of ft."""
