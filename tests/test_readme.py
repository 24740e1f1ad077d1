"""The README's code is code: the own-model snippet runs as written, its commands exist.

The snippet under "Attack and recalibrate your own model" is executed verbatim with a small
trained classifier bound to the names it documents (``model``, ``x_val``, ``y_val``, ``x``,
``y``); a README edit that breaks it breaks this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from calib.attacks import AttackResult

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPET_HEADING = "## Attack and recalibrate your own model"


def readme_section(heading: str) -> str:
    """The README text from ``heading`` to the next heading of the same level."""
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def patch_images(n: int, num_classes: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 12, 12) images in [0, 1] whose class is the position of a brighter patch."""
    labels = torch.randint(num_classes, (n,), generator=generator)
    images = 0.4 * torch.rand(n, 3, 12, 12, generator=generator)
    for k in range(num_classes):
        rows = slice(3 * k, 3 * k + 3)
        images[labels == k, :, rows, 3:9] += 0.5
    return images.clamp(0, 1), labels


def trained_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(128, num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_readme_has_one_own_model_snippet_of_about_ten_lines():
    blocks = python_blocks(readme_section(SNIPPET_HEADING))
    assert len(blocks) == 2, "the own-model snippet, then the attack-grid snippet"
    code_lines = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip()
                  .startswith("#")]
    assert 6 <= len(code_lines) <= 14, code_lines


def test_own_model_snippet_runs_as_written(one_thread, capsys):
    generator = torch.Generator().manual_seed(0)
    num_classes = 4
    x_train, y_train = patch_images(256, num_classes, generator)
    x_val, y_val = patch_images(128, num_classes, generator)
    x, y = patch_images(24, num_classes, generator)
    model = trained_classifier(x_train, y_train, num_classes)
    assert (model(x).argmax(1) == y).float().mean() > 0.9  # a real classifier, not noise

    namespace = {"model": model, "x_val": x_val, "y_val": y_val, "x": x, "y": y}
    exec(compile(python_blocks(readme_section(SNIPPET_HEADING))[0], "README.md", "exec"),
         namespace)

    printed = capsys.readouterr().out
    assert "ece" in printed  # the summaries were printed
    results = [v for v in namespace.values() if isinstance(v, AttackResult)]
    assert results, "the snippet keeps an AttackResult"
    for result in results:
        summary = result.summary()
        assert summary["label_preserved"] == 1.0
        assert summary["linf_max"] <= result.eps + 1e-6
        assert summary["accuracy_after"] == summary["accuracy_before"]
    uca = [r for r in results if r.kind == "uca"]
    assert uca and uca[0].final_confidence.mean() < uca[0].clean_confidence.mean()


def test_attack_grid_snippet_runs_as_written(one_thread):
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = patch_images(256, 4, generator)
    x, y = patch_images(8, 4, generator)
    model = trained_classifier(x_train, y_train, 4)
    source = python_blocks(readme_section(SNIPPET_HEADING))[1]
    # The README's budget is a real one; the test shortens it to seconds, nothing else.
    source = source.replace("square_iterations=1000", "square_iterations=5")
    source = source.replace("pgd_iterations=100", "pgd_iterations=3")
    namespace = {"model": model, "x": x, "y": y}
    exec(compile(source, "README.md", "exec"), namespace)
    run, table, records = namespace["run"], namespace["table"], namespace["records"]
    assert len(table) == 3 * 4 and {s["model"] for s in table} == {"mine"}
    assert all(s["label_preserved"] == 1.0 for s in table)
    assert len(records) == 8 * len(run.results)


@pytest.mark.parametrize("command", ["make reproduce", "make test",
                                     "dvc exp run -S attack.eps=0.03", "dvc metrics diff",
                                     "dvc plots diff", "dvc exp run --queue",
                                     "dvc queue start --jobs", "make profile PROFILE=paper"])
def test_readme_documents_the_commands(command):
    assert command in README.read_text(encoding="utf-8"), command


def test_readme_thumbnails_and_links_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.endswith(".png") for t in local), "the README shows figure thumbnails"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
