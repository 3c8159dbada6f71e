"""The shapes world: images of coloured shapes and what is said about them, for training a small
SESAME from scratch and checking that it learned to See, Say and Segment.

    python -m dataset.shapes OUT_DIR --images N --seed S [--workers K]

- `scene.py`: one image: 1-5 shapes (circle, square, rectangle, triangle, star; six colours; small
  or big) at random positions, possibly overlapping, on a gradient, striped, checkered or cloudy
  background, in images of varied size and aspect ratio. Ground truth = the visible pixels.
- `language.py`: referring expressions by attribute, size, spatial relation and order, each naming
  exactly one object; false premises naming an absent object, with `gt_sent` naming the nearest
  present one; VQA questions and answers.
- `world.py`: the data root: FP-RefCOCO-style `fprefcoco` and RefCOCO-style `refcoco` (refs pickle +
  instances.json with polygons, train / val / test by image), LLaVA-Instruct-style VQA.
- `tokenizer.py`: a small sentencepiece vocabulary trained on the world's text, the prompts and the
  question / answer templates.

The same world for the same seed and arguments, byte for byte, however many workers draw it.
dataset/synthetic.py draws its scenes with `scene.make_scene` too.
"""
