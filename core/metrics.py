"""Evaluation metrics as pure functions: retrieval recall, zero-shot accuracy, and the answer
metrics of VLM benchmarks (exact match, VQAv2 soft accuracy, ANLS, ChartQA's relaxed accuracy).

No I/O, no distributed code: callers gather, de-duplicate and order the features (or answers)
first. Ties always count against the model, so a degenerate model (every score equal) scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch


def _rank_of(sim: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """For each row of sim, how many OTHER entries score >= the entry at cols (0 = best).

    The positive is read out of sim itself: scoring it with a different formula (e.g.
    (a * b).sum(-1) against a @ b.T) rounds differently, can put the row's own entry below its
    "positive" and makes the rank one too good. A NaN positive ranks last.
    """
    positive = sim[torch.arange(sim.shape[0], device=sim.device), cols]
    rank = (sim >= positive[:, None]).sum(dim=1) - 1
    return torch.where(positive.isnan(), sim.shape[1] - 1, rank)


def retrieval_ranks(
    query: torch.Tensor, candidates: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of candidates[i] among all candidates for query[i] (dot-product score).

    Rows are scored in [chunk, n] blocks so memory stays flat for large splits; exact ties count
    against the model (rank = number of other candidates scoring >= the true one).
    """
    n = query.shape[0]
    if candidates.shape[0] != n:
        raise ValueError(f"{n} queries but {candidates.shape[0]} candidates: they must pair up")
    ranks = torch.empty(n, dtype=torch.long, device=query.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=query.device)
        ranks[rows] = _rank_of(query[rows] @ candidates.T, rows)
    return ranks


def retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024
) -> dict:
    """Recall@k both ways over the whole split; image[i] and text[i] are a pair.

    i2t: each image queries all texts; t2i: each text queries all images. Features are usually
    L2-normalised (cosine similarity) but any dot-product score works.
    """
    i2t = retrieval_ranks(image, text, chunk)
    t2i = retrieval_ranks(text, image, chunk)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i < k).float().mean().item()
    out["num_pairs"] = image.shape[0]
    return out


def zeroshot_accuracy(
    features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
) -> float | None:
    """CLIP-style zero-shot accuracy: the predicted class is the most similar class prompt.

    labels < 0 mark samples without an unambiguous label and are skipped. A tie between the true
    class and any other counts as wrong (argmax would pick by index, i.e. by luck). None when no
    sample has a label.
    """
    keep = labels >= 0
    if not keep.any():
        return None
    sim = features[keep] @ class_features.T
    correct = _rank_of(sim, labels[keep].to(sim.device)) == 0
    return correct.float().mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """clip_benchmark's zero-shot classification metrics of logits [n, classes] and labels [n]:
    `acc{k}` (the true class among the k best) for each k up to the number of classes, and
    `mean_per_class_recall` (the mean over the classes present in labels of the fraction of
    their samples classified right: sklearn's balanced accuracy, which clip_benchmark reports).
    Ties count against the model (clip_benchmark's topk and argmax break them by position):
    without ties the numbers are clip_benchmark's."""
    rank = _rank_of(logits, labels.to(logits.device)).cpu()
    labels = labels.cpu()
    out = {f"acc{k}": (rank < k).double().mean().item() for k in ks if k <= logits.shape[1]}
    hits = torch.bincount(labels, weights=(rank == 0).double(), minlength=logits.shape[1])
    counts = torch.bincount(labels, minlength=logits.shape[1]).double()
    present = counts > 0
    out["mean_per_class_recall"] = (hits[present] / counts[present]).mean().item()
    return out


def multi_caption_retrieval(
    image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor, ks=(1, 5, 10),
    chunk: int = 1024,
) -> dict:  # fmt: skip
    """Recall@k of image [I, d] and text [T, d] features where text t describes image
    text_image[t] (COCO and Flickr30k: 5 captions an image), as clip_benchmark's
    zeroshot_retrieval computes it: `image_retrieval_recall@k`, a text's image among the k best
    images for it; `text_retrieval_recall@k`, ANY of an image's texts among the k best texts for
    it. Scores are text @ image.T; ties count against the model."""
    text_image = text_image.to(text.device)
    n_images = image.shape[0]
    # Pass 1: each text's rank among the images, and each image's best caption score.
    t2i = torch.empty(text.shape[0], dtype=torch.long)
    best = torch.full((n_images,), float("-inf"), device=text.device)
    for start in range(0, text.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, text.shape[0]), device=text.device)
        sim = text[rows] @ image.T
        t2i[rows.cpu()] = _rank_of(sim, text_image[rows]).cpu()
        own = sim[torch.arange(len(rows), device=sim.device), text_image[rows]]
        best.scatter_reduce_(0, text_image[rows], own, reduce="amax")
    # Pass 2: for each image, how many texts of OTHER images score >= its best caption: the
    # image is a hit at k when fewer than k do. A NaN best caption counts as a miss.
    beaten = torch.zeros(n_images, dtype=torch.long, device=text.device)
    for start in range(0, text.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, text.shape[0]), device=text.device)
        sim = text[rows] @ image.T
        other = text_image[rows, None] != torch.arange(n_images, device=sim.device)
        beaten += ((sim >= best) & other).sum(dim=0)
    beaten = torch.where(best.isnan(), text.shape[0], beaten).cpu()
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (t2i < k).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = (beaten < k).double().mean().item()
    return out


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation dropped: "Red." == "red"."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"")


def exact_match(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)


def vqa_accuracy(records: Iterable[tuple[str, str, str, str | Sequence[str]]],
                 metric: str = "exact") -> dict:  # fmt: skip
    """Mean `metric` score (ANSWER_METRICS) overall and per source from (key, source,
    prediction, reference) records, named by the metric: `vqa_acc` and `vqa_acc/<source>` for
    exact match, `vqav2_acc`, `anls`, `relaxed_acc` for the others. A reference is one answer or
    a list of every accepted answer (VQAv2's 10 human answers, DocVQA's variants).

    Keys must be unique: gathering from several ranks can repeat samples, and counting one twice
    silently skews the score, so callers de-duplicate and a repeat here is an error.
    """
    if metric not in ANSWER_METRICS:
        raise ValueError(f"no answer metric {metric!r}; valid: {', '.join(ANSWER_METRICS)}")
    name, score = ANSWER_METRICS[metric]
    seen: set[str] = set()
    by_source: dict[str, list[float]] = {}
    for key, source, prediction, reference in records:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}: de-duplicate records before scoring")
        seen.add(key)
        answers = [reference] if isinstance(reference, str) else list(reference)
        if not answers:
            raise ValueError(f"question {key!r} has no reference answer")
        by_source.setdefault(source, []).append(float(score(prediction, answers)))
    hits = [c for cs in by_source.values() for c in cs]
    out = {name: sum(hits) / len(hits) if hits else 0.0, "num_questions": len(hits)}
    for source, cs in sorted(by_source.items()):
        out[f"{name}/{source}"] = sum(cs) / len(cs)
    return out


# ---------------------------------------------------------------- answer metrics of benchmarks
# Each scores one prediction against every accepted answer of its question: (prediction,
# answers) -> a score in [0, 1]. The normalisations are the benchmarks' own, so numbers are
# comparable with papers (tests/test_vqa_metrics.py checks them against lmms-eval's copies).


def exact_score(prediction: str, answers: Sequence[str]) -> float:
    """1 when the prediction equals any answer after `normalise_answer`, else 0."""
    return float(any(exact_match(prediction, answer) for answer in answers))


# The VQA API's answer normalisation (GT-Vision-Lab/VQA, vqaEval.py: processPunctuation and
# processDigitArticle), its tables as the official script has them.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
# Keys with capitals ("Im", "Ive") never match: the words are lower-cased first, as officially.
VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                   "<", "@", "`", ",", "?", "!")  # fmt: skip
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a lookahead, not a lookbehind,
# so every period not followed by a digit goes ("1.5" stays, "5." and "e.g." lose theirs).
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_normalise(text: str) -> str:
    """An answer in the VQA evaluation's normal form: "Two dogs." -> "2 dogs", "the cat" ->
    "cat", "dont" -> "don't", "1,000" -> "1000", "black/white" -> "black white".

    Punctuation: a mark next to a space, or any mark in a text with a digit-comma-digit, is
    deleted; otherwise it becomes a space. Then periods not followed by a digit are dropped, the
    text lower-cased and split into words, number words up to ten become digits, articles go and
    missing apostrophes are restored (VQA_CONTRACTIONS).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    number_comma = _VQA_DIGIT_COMMA.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text  # tested on the input, as officially
        out = out.replace(mark, "" if spaced or number_comma else " ")
    # count=32: the official call passes re.UNICODE (32) where `count` goes, so at most 32
    # periods are stripped; kept, so that an answer of dots scores as it does there.
    out = _VQA_PERIOD.sub("", out, count=32)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES]
    return " ".join(words)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy: for each of the n human answers, min(1, matches among the other
    n - 1 / 3), averaged over the n (the official leave-one-out form; with 10 answers of which
    k match: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1, where the usual shorthand
    min(k / 3, 1) says 0.33, 0.67, 1). Prediction and answers are compared after
    `vqa_normalise`.

    The VQA API normalises the answers with processPunctuation alone because its released
    answers are already normalised; lmms-eval normalises both fully, and so does this, so that
    answers written any way ("Two", "the red one") compare as the prediction does.

    One answer (a dataset without several annotators): 1 if it matches, else 0 (leave-one-out
    over one answer would always give 0).
    """
    if not answers:
        raise ValueError("vqav2_accuracy needs at least one answer")
    predicted = vqa_normalise(prediction)
    matches = [vqa_normalise(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    k = sum(matches)
    # leaving out a matching answer leaves k - 1 matches among the others, any other leaves k
    return sum(min(1.0, (k - held_out) / 3) for held_out in matches) / len(matches)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one question (ST-VQA, DocVQA, InfographicVQA):
    the best over the answers of 1 - distance / the longer length, after lower-casing and
    collapsing whitespace; below `threshold` (0.5) it counts 0. Two empty strings are equal (1).

    The RRC scripts (and lmms-eval's copy) divide by the lengths *before* whitespace is collapsed,
    so a prediction with stray spaces scores a little higher there; this divides by the
    compared strings' lengths (tests/test_vqa_metrics.py shows both).
    """
    if not answers:
        raise ValueError("anls needs at least one answer")
    predicted = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        truth = " ".join(answer.lower().split())
        longest = max(len(predicted), len(truth))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(predicted, truth) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def _to_float(text: str) -> float | None:
    """A number as ChartQA's evaluation reads one: "12.5", "-3", "1e3"; "40%" -> 0.4. Commas
    are not separators there ("1,000" is not a number and is compared as text)."""
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Masry et al. 2022 after Methani et al. 2020, as pix2struct
    and lmms-eval compute it): a numeric answer is right within `tolerance` relative error,
    |prediction - answer| <= 0.05 |answer|; anything else (and a zero answer, whose relative
    error is undefined) must match exactly, case-insensitively. Surrounding whitespace is
    dropped first. The best over the answers (ChartQA has one)."""
    if not answers:
        raise ValueError("relaxed_accuracy needs at least one answer")
    predicted = prediction.strip()
    value = _to_float(predicted)
    for answer in answers:
        answer = answer.strip()
        target = _to_float(answer)
        if value is not None and target:  # target 0 or None: compared as text
            if abs(value - target) / abs(target) <= tolerance:  # this form: same rounding
                return 1.0
        elif predicted.lower() == answer.lower():
            return 1.0
    return 0.0


# `vqa` evaluator's `metric` option -> (name of the metric in eval.json, score function)
ANSWER_METRICS: dict[str, tuple[str, Callable[[str, Sequence[str]], float]]] = {
    "exact": ("vqa_acc", exact_score),
    "vqav2": ("vqav2_acc", vqav2_accuracy),
    "anls": ("anls", anls),
    "relaxed": ("relaxed_acc", relaxed_accuracy),
}
