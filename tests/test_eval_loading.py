"""evaluation/loading.py: the loader's ground-truth RLEs are those of each query, with every distinct
mask encoded once (queries that share a mask share its RLEs)."""
import numpy as np

import evaluation.loading as loading
from dataset.eval_sets import BlankMask, EvalImage, EvalQuery


class _Predictor:
    def prepare(self, rgb, prompts, **kwargs):
        return ("work", len(prompts))


def test_shared_masks_are_encoded_once_and_each_query_gets_its_own_rles(monkeypatch):
    h, w = 12, 10
    ref_a = np.zeros((h, w), np.uint8)
    ref_a[2:5, 3:7] = 1
    ref_b = np.zeros((h, w), np.uint8)
    ref_b[6:9, 1:4] = 1
    ref_b[0, 0] = 255  # an ignore pixel
    blank = BlankMask(h, w)

    def query(k, mask, exists):
        return EvalQuery(ref_id=k // 2, sent_id=k, sentence=f"s{k}", question="<image>\nq", gt_exists=exists,
                         gt_sent=None, gt_mask=mask)

    # a's two sentences share one array; b has its own; two false premises share the image's blank
    queries = [query(0, ref_a, True), query(1, ref_a, True), query(2, ref_b, True), query(3, blank, False),
               query(4, blank, False)]
    image = EvalImage("x.jpg", 1, h, w, queries)
    want = [loading.ground_truth_rles(image, q) for q in queries]
    calls = []
    encode = loading.encode_optional
    monkeypatch.setattr(loading, "encode_optional", lambda m: calls.append(1) or encode(m))
    loader = loading.ImageLoader([(image, queries)], [[[1]] * len(queries)], _Predictor(),
                                 lambda im: np.zeros((h, w, 3), np.uint8), keep_rgb=False)
    got = loader(0).gt_rles
    assert got == want
    assert got[0][0] is not None and got[2][1] is not None and got[3] == (None, None)
    # per distinct mask a foreground and an ignore RLE (a false premise has no foreground): a 2, b 2,
    # blank 1, where query by query would make 8
    assert len(calls) == 5
