"""benchmarks/bench_forward.py runs at a tiny size: every fp32 variant agrees with eager fp32."""

from __future__ import annotations

import json
import sys

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_forward():
    yield load_benchmark("bench_forward")
    sys.modules.pop("bench_forward", None)


def test_tiny_run_times_every_variant_and_checks_agreement(bench_forward, tmp_path, capsys):
    out = tmp_path / "forward.json"
    rows = bench_forward.main(["--tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    expected = [v for v in bench_forward.VARIANTS if v != "compile_frozen"]
    for batch in (4, 8):
        assert [r.variant for r in rows if r.batch == batch] == expected
    for row in rows:
        assert row.images_per_s > 0 and row.speedup > 0
        if row.variant == "eager":
            assert row.speedup == 1.0 and row.max_abs_logit_diff == 0.0
        elif row.variant in bench_forward.FP32_VARIANTS:
            # fp32 rewrites of the same network: rounding-level differences only
            assert row.max_abs_logit_diff < 1e-4 and row.labels_differ == 0.0, row
    # the pipeline's query graph is built (no fallback) and made dense for the images' shape
    assert all(r.note == "" for r in rows if r.variant == "query_graph"), rows
    assert "fastest fp32 forward" in printed and "| model | threads |" in printed
    assert len(json.loads(out.read_text())) == len(rows)


def test_an_unknown_variant_is_refused(bench_forward):
    with pytest.raises(SystemExit):
        bench_forward.main(["--tiny", "--variants", "fp16"])
    with pytest.raises(ValueError, match="unknown variant"):
        bench_forward.build_variant("fp16", None, None)
