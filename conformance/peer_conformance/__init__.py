"""peer_conformance — proves a PEER backend computes the reference's function.

Run it against any backend implementing ``peer_backends.contract``:

    pytest --pyargs peer_conformance --peer-backend NAME

One test module per section of spec/SPEC.md (its ``SECTION``); strategies in ``strategies``,
assertions in ``helpers``, the end-of-run verdict in ``verdict``; known divergences in
``divergences.toml``. A backend that supports part of the spec's options declares them
(``peer_backends.options``); outside implementations are wrapped by adapters such as
``peer_conformance.adapters.peer_pytorch``.
"""
