"""Prompt templates: the built-in file, the seeded choice, user files and their validation."""

from __future__ import annotations

from collections import Counter

import pytest

from vpit.pipelines.templates import DEFAULT_TEMPLATES, load_templates, pick_index


def test_builtin_templates():
    t = load_templates()
    assert t.path == str(DEFAULT_TEMPLATES)
    assert t.groups["generation"].user[0] == "Generate an image of {caption}"  # MetaMorph's default first
    assert t.assistant("generation") == "Here is an image based on your request:"
    assert t.user("editing", "000000001", 0, instruction="make the circle blue") == "make the circle blue"


def test_choice_is_seeded_by_key_and_uses_every_variant():
    t = load_templates()
    keys = [f"{i:09d}" for i in range(600)]
    picks = [t.user("generation", k, 0, caption="a {red} cat") for k in keys]
    assert picks == [t.user("generation", k, 0, caption="a {red} cat") for k in keys]  # stable
    assert all(p.endswith("a {red} cat") or "a {red} cat" in p for p in picks)  # braces in captions kept
    counts = Counter(picks)
    assert len(counts) == len(t.groups["generation"].user)
    assert min(counts.values()) > 600 / len(counts) * 0.6  # no variant starved
    other = [t.user("generation", k, 1, caption="x") for k in keys]
    assert other != [t.user("generation", k, 0, caption="x") for k in keys]  # the seed matters
    assert pick_index(0, "000000007", 5) == pick_index(0, "000000007", 5)


def test_user_file_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "generation: {user: ['Paint {caption}, please'], assistant: 'Done:'}\n"
        "video_prediction: {user: ['Next?'], assistant: 'Next:'}\n"
        "editing: {user: ['Edit: {instruction}'], assistant: 'Edited:'}\n"
    )
    t = load_templates(path)
    assert t.user("generation", "k", 0, caption="a dog") == "Paint a dog, please"
    assert t.assistant("editing") == "Edited:"
    assert t.sha256 != load_templates().sha256


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "generation: {user: ['Paint {prompt}'], assistant: 'x'}\nvideo_prediction: {user: ['n'], assistant: 'n'}\n"
            "editing: {user: ['{instruction}'], assistant: 'e'}\n",
            r"generation.user\[0\] = 'Paint \{prompt\}': must use exactly \{caption\}",
        ),
        ("generation: {user: ['{caption}'], assistant: 'x'}\n", r"missing groups \['editing', 'video_prediction'\]"),
        (
            "generation: {user: [], assistant: 'x'}\nvideo_prediction: {user: ['n'], assistant: 'n'}\n"
            "editing: {user: ['{instruction}'], assistant: 'e'}\n",
            r"generation.user: expected a non-empty list",
        ),
        (
            "generation: {user: ['{caption'], assistant: 'x'}\nvideo_prediction: {user: ['n'], assistant: 'n'}\n"
            "editing: {user: ['{instruction}'], assistant: 'e'}\n",
            r"write literal braces as \{\{ and \}\}",
        ),
    ],
)
def test_bad_template_files(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_templates(path)


def test_missing_file():
    with pytest.raises(ValueError, match="templates: '/nonexistent.yaml' is not a file"):
        load_templates("/nonexistent.yaml")
