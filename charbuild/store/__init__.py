"""The store: bytes and digests. Content-addressed objects (objects.py), answered calls
(calls.py), hashing primitives, the digest memo and the one atomic-write helper."""
