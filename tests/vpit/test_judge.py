"""The shapes-world judge: exact on renders, at chance on noise, and one wrong quadrant costs
exactly that quadrant."""

from __future__ import annotations

import numpy as np
import pytest

from vpit.judge import METRICS, Reading, TokenJudge, chance, question_type, read_pixels, score
from vpit.shapes import COLORS, QUADRANTS, Scene, caption, parse_caption, questions, random_scene, render

SCENES = [random_scene(np.random.default_rng(7)) for _ in range(1)]


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [random_scene(rng) for _ in range(240)]


@pytest.mark.parametrize("size", [32, 64, 96])
def test_renders_of_known_scenes_score_100_percent(scenes, size):
    readings = [read_pixels(render(s, size)) for s in scenes]
    assert score(readings, scenes) == dict.fromkeys(METRICS, 1.0)


def test_random_pixels_score_about_chance(scenes):
    rng = np.random.default_rng(1)
    readings = [read_pixels(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in scenes]
    got, base = score(readings, scenes), chance()
    assert abs(got["background"] - base["background"]) < 0.1
    assert got["colour_at_position"] < 2 * base["colour_at_position"] and got["exact_scene"] == 0.0


def test_one_wrong_quadrant_costs_exactly_that_quadrant():
    scene = Scene("white", (("circle", "red", "top left"), ("square", "blue", "bottom right")))
    recoloured = Scene("white", (("circle", "green", "top left"), ("square", "blue", "bottom right")))
    reshaped = Scene("white", (("triangle", "red", "top left"), ("square", "blue", "bottom right")))
    added = Scene("white", (*scene.shapes, ("circle", "yellow", "top right")))
    assert score([read_pixels(render(recoloured, 64))], [scene]) == {
        "background": 1.0,
        "colour_at_position": 0.5,  # one of the two objects
        "shape": 1.0,
        "exact_scene": 0.0,
    }
    assert score([read_pixels(render(reshaped, 64))], [scene]) == {
        "background": 1.0,
        "colour_at_position": 1.0,
        "shape": 0.5,
        "exact_scene": 0.0,
    }
    # a shape drawn where the scene has none is not an object of the scene: only exact_scene sees it
    assert score([read_pixels(render(added, 64))], [scene]) == {
        "background": 1.0,
        "colour_at_position": 1.0,
        "shape": 1.0,
        "exact_scene": 0.0,
    }


def test_the_token_judge_reads_true_tokens_and_random_tokens_score_about_chance(scenes):
    from vpit.model.encoder import EncoderConfig, tiny_encoder

    enc = tiny_encoder(EncoderConfig(encoder="tiny"))
    judge = TokenJudge(enc.encode)
    tokens = enc.encode([render(s, 64) for s in scenes])
    true = score([judge.read(t) for t in tokens], scenes)
    assert true["background"] == 1.0 and true["colour_at_position"] > 0.9 and true["shape"] > 0.9
    rng = np.random.default_rng(2)
    rand = score([judge.read(rng.standard_normal(tokens[0].shape)) for _ in scenes], scenes)
    base = chance()
    for key in ("background", "colour_at_position", "shape"):
        assert abs(rand[key] - base[key]) < 0.1, (key, rand[key], base[key])
    # one quadrant's tokens replaced by another scene's: only that quadrant's reading moves
    scene = Scene("black", (("square", "red", "top left"), ("circle", "blue", "bottom right")))
    other = Scene("black", (("square", "red", "top left"), ("triangle", "yellow", "bottom right")))
    a, b = enc.encode([render(scene, 64), render(other, 64)])
    mixed = a.copy()
    mixed[judge.cells["bottom right"]] = b[judge.cells["bottom right"]]
    reading = judge.read(mixed)
    assert reading.quadrants["bottom right"] == ("triangle", "yellow")
    assert reading.quadrants["top left"] == ("square", "red") and reading.background == "black"


def test_chance_levels_are_those_of_a_uniform_reading():
    base = chance()
    assert base["background"] == pytest.approx(1 / 3)
    assert base["colour_at_position"] == pytest.approx(3 / 19) and base["shape"] == pytest.approx(6 / 19)


def test_captions_parse_back_into_their_scenes(scenes):
    assert all(parse_caption(caption(s)) == s for s in scenes)
    for text in ("a red circle in the top left", "a pink circle in the top left on a white background", "hello"):
        assert parse_caption(text) is None


def test_every_question_has_a_type(scenes):
    kinds = {question_type(q) for s in scenes for q, _ in questions(s)}
    assert kinds == {"count", "background", "shape", "position", "colour"}
    assert question_type("What is the meaning of life?") is None
    assert Reading.of(SCENES[0]).quadrants.keys() == set(QUADRANTS) and len(COLORS) == 6
