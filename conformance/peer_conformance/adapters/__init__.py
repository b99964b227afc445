"""Outside PEER implementations behind the backend contract (``peer_backends.contract``), so the
conformance suite can judge them: ``pytest --pyargs peer_conformance --peer-backend
peer_conformance.adapters.NAME``. Each module imports its implementation only when called."""
