"""SPEC §9.2 Non-finite values: NaN propagates to its own token only (evaluation mode)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from peer_ref import TOLERANCES

from .helpers import assert_close, run_backend
from .strategies import SECONDARY, cases


@SECONDARY
@given(case=cases(training=False, masked=False, lead=(5,)), token=st.integers(0, 4))
def test_nan_stays_in_its_token(backend, case, token):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    tol = TOLERANCES[dtype]
    x = case.x.copy()
    x[token, 0] = np.nan
    y_clean, _, _ = run_backend(backend, case, dtype)
    y, _, _ = run_backend(backend, case._replace(x=x), dtype)
    y, y_clean = np.asarray(y).astype(np.float64), np.asarray(y_clean).astype(np.float64)
    assert np.all(np.isnan(y[token])), f"y[{token}]={y[token].tolist()}, but should be all NaN [{case.describe()}]"
    others = [t for t in range(5) if t != token]
    assert_close(y[others], y_clean[others], rtol=tol.rtol, atol=tol.atol, what="y[other tokens]",
                 context=case.describe())
