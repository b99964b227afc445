"""peer_conformance — proves a PEER backend computes the reference's function.

Run it against any backend implementing ``peer_backends.contract``:

    pytest --pyargs peer_conformance --peer-backend NAME

One test module per section of spec/SPEC.md; strategies in ``strategies``, assertions
in ``helpers``; known divergences in ``divergences.toml``.
"""
