"""A seeded user simulator that reacts to the slates a recommender shows. Pure: numpy/pandas, no I/O.

What it is for: driving the real service (in-process through ``serving.recommender.RecommenderCore``,
or over HTTP) with users whose taste is known, so a feedback loop, a retraining policy or an online
experiment can be measured before any real user sees it.

The model of a user (all of it stated here, nothing hidden):

1. **Taste** (a ground truth of another family than the served model, fitted on *all* the data, so
   it knows each user better than any served model): ``GroundTruth`` is EASE (Steck, WWW 2019) or
   ItemKNN (Sarwar et al., WWW 2001) over the binary user-item matrix of the positive events
   (``models.baselines``). For a history h (item ids, oldest first) the raw utility of item i is
   ``sum over distinct known items j of h of W[j, i]`` (the baselines' scoring), shape (n_items,).
   The simulated user's utility is ``u = standardize(raw) + noise * eps``: the raw scores centred and
   scaled to unit standard deviation over the catalogue, plus a per-user Gaussian taste noise
   ``eps ~ N(0, 1)`` fixed per (user, item) for the whole simulation (drawn once per user). The
   history grows with every click, so ``u`` moves as the user consumes.
2. **Examination** (position-based model, PBM: Craswell, Zoeter, Taylor & Ramsey, "An experimental
   comparison of click position-bias models", WSDM 2008; Chuklin, Markov & de Rijke, "Click Models for
   Web Search", 2015, ch. 3): the slot at 1-based position p is examined with probability
   ``examine_decay ** (p - 1)``, independently of the item.
3. **Attractiveness**: an examined item is clicked with probability
   ``sigmoid(click_slope * u_i + b)``; an item already in the user's history (consumed) is never
   clicked (probability 0), nor is an item the ground truth does not know, nor the second copy of an
   item shown twice in one slate. The bias b is calibrated once, at construction, by bisection: the
   mean over (a seeded sample of up to ``CALIBRATION_USERS``) users of P(click | examined) of the
   ground truth's own top-1 unseen item (noise included) equals ``target_top_ctr``
   (``UserSimulator.calibration`` states what was reached). The default slope (0.6) spreads clicks over
   many items rather than over the truth's top handful (``SimConfig`` states how it was chosen).
4. **Reactions**: one per slot, ``click`` (examined and attracted), ``skip`` (an explicit dislike:
   examined, not clicked, and the item's utility u is below ``skip_below``, by default 0 = below the
   user's average item; ``skip_below=None``: never) or ``ignore`` (not examined, or examined and neither
   clicked nor disliked, or unknown to the truth). A skip is the platform's "not interested" (the event
   policy hides the item from that user for 30 days), so the simulated user presses it only on what it
   dislikes, not on everything it looked at and passed over. Clicks are appended to the history in slot
   order after the slate (the probabilities of one slate come from the history before it).
5. **Sessions** (the idea of RecSim, Ie et al. 2019, and RecoGym, Rohde et al. 2018: a user
   answers a sequence of slates and leaves): after a slate with a click the session continues with
   probability ``p_continue_click``, else ``p_continue_no_click``, for at most ``max_slates`` slates.

Determinism: every random draw of a slate comes from
``np.random.default_rng([seed, stable_hash(user_id), session, step, stream])`` (``stream`` 0: the
slate's examination and click draws; 1: the continuation draw), and the taste noise from
``np.random.default_rng([seed, stable_hash(user_id)])``; ``stable_hash`` is the first 8 bytes of
sha256 (Python's ``hash`` is salted per process). A user's session therefore depends only on the
seed, the user, the session and step numbers, and the slates shown, never on the order in which
users are simulated.

Units: utilities are in standard deviations of the user's raw utility over the catalogue; positions
are 1-based; probabilities are in [0, 1]; CTR is clicks per slot shown.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from models.baselines import EASE, ItemKNN

#: The ground-truth families (``SimConfig.truth``); never the served model's family (SASRec, GRU4Rec).
TRUTH_KINDS = ("ease", "itemknn")
#: Users in the calibration sample of the click bias (a seeded sample when there are more).
CALIBRATION_USERS = 200
ACTIONS = ("click", "skip", "ignore")
_BISECTION_STEPS = 200
_BIAS_RANGE = (-60.0, 60.0)

Recommend = Callable[[str, int], tuple[list[str], str]]
Feedback = Callable[[str, "Reaction", str], None]


def stable_hash(text: str) -> int:
    """The first 8 bytes of sha256(``text``) as an unsigned big-endian int (the same in every process)."""
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:8], "big")


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free logistic


@dataclass(frozen=True)
class SimConfig:
    """The simulated users' parameters (see the module docstring for the model they belong to).

    Attributes:
        k: slate size asked from the service.
        truth: ground-truth family, ``"ease"`` | ``"itemknn"`` (never the served model's family).
        noise: per-user Gaussian taste noise, in units of the user's standardized utility.
        examine_decay: position-based model: P(examine position p) = examine_decay ** (p - 1).
        target_top_ctr: calibration: P(click | examined) of the ground truth's own top-1 unseen item,
            averaged over users.
        click_slope: logistic slope on the standardized utility (the bias is calibrated). The default 0.6
            was chosen on a validation slice (300 ml-100k users hashed with a "validation" salt, simulator
            and champion seed 100, none of the reported studies' seeds), EASE truth, the first slate's
            expected CTR@10: truth top-10 8.5 %, the SASRec champion (4 epochs) 4.2 %, popularity 3.8 %,
            random 0.5 %. With the earlier 1.5 the truth's top-1 (about 5.6 SD above the mean) is the only
            kind of item with a real click chance (bias about -10.4): CTRs of 2.4 / 2.2 / 0.02 % that
            collapse as those few items are consumed. 0.5 (4.8 / 4.4 / 0.95 %) makes random too good
            (a fifth of the strong model), 0.8 (3.4 / 3.0 / 0.19 %) concentrates clicks again.
        max_slates: slates per session at most.
        p_continue_click: after a slate with a click, the session continues with this probability.
        p_continue_no_click: after a slate without a click, the session continues with this probability.
        skip_below: explicit dislike: an examined, not clicked item whose utility u (standardized, noise
            included) is below this is reported as "skip" (the platform's "not interested"), otherwise
            "ignore". Default 0.0: below the user's average item (about 91 % of a SASRec slate's items
            and 34 % of a random slate's are at or above it on the validation slice). None: never skip.
        seed: the simulation's seed.
    Raises:
        ValueError: a value outside its range.
    """

    k: int = 10
    truth: str = "ease"
    noise: float = 0.5
    examine_decay: float = 0.8
    target_top_ctr: float = 0.3
    click_slope: float = 0.6
    max_slates: int = 5
    p_continue_click: float = 0.8
    p_continue_no_click: float = 0.3
    skip_below: float | None = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.k < 1:
            problems.append(f"k={self.k} must be >= 1")
        if self.truth not in TRUTH_KINDS:
            problems.append(f"truth={self.truth!r} must be one of {list(TRUTH_KINDS)}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            problems.append(f"noise={self.noise} must be >= 0")
        if not 0 < self.examine_decay <= 1:
            problems.append(f"examine_decay={self.examine_decay} must be in (0, 1]")
        if not 0 < self.target_top_ctr < 1:
            problems.append(f"target_top_ctr={self.target_top_ctr} must be in (0, 1)")
        if not (math.isfinite(self.click_slope) and self.click_slope > 0):
            problems.append(f"click_slope={self.click_slope} must be > 0")
        if self.skip_below is not None and not math.isfinite(self.skip_below):
            problems.append(f"skip_below={self.skip_below} must be a finite number or None")
        if self.max_slates < 1:
            problems.append(f"max_slates={self.max_slates} must be >= 1")
        for name in ("p_continue_click", "p_continue_no_click"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GroundTruth:
    """The simulated users' taste model: an item-item weight matrix W, (n_items, n_items).

    Attributes:
        kind: ``"ease"`` | ``"itemknn"``.
        item_ids: the catalogue the truth knows, in index order (ids as strings, sorted).
        weights: (n_items, n_items) float32, row = history item, column = scored item.
        popularity: (n_items,) float64 count of users with a positive event on each item.
        params: the family's parameters (e.g. ``{"l2": 500.0}``).
    """

    def __init__(self, kind: str, item_ids: Iterable[str], weights: np.ndarray, popularity: np.ndarray,
                 params: Mapping[str, Any] | None = None) -> None:
        self.kind = kind
        self.item_ids: list[str] = [str(i) for i in item_ids]
        self.weights = np.asarray(weights, dtype=np.float32)
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.params = dict(params or {})
        n = len(self.item_ids)
        if self.weights.shape != (n, n) or self.popularity.shape != (n,):
            raise ValueError(f"weights {self.weights.shape} / popularity {self.popularity.shape} do not match "
                             f"{n} items")
        self._index = pd.Index(self.item_ids, dtype=object)

    @classmethod
    def fit(cls, events: pd.DataFrame, kind: str = "ease", **kw: Any) -> GroundTruth:
        """Fit the truth on ``events``: every row is a positive (apply the event policy first, e.g.
        ``recloop.policy.EventPolicy.positives``; the simulator fits it on ALL of the data).

        Args:
            events: a frame with ``user_id`` and ``item_id``.
            kind: ``"ease"`` (kw: ``l2``, default 500) or ``"itemknn"`` (kw: ``k_neighbours``, default
                100, ``shrink``, default 0).
        Raises:
            ValueError: an unknown kind, missing columns or no events.
        """
        if kind not in TRUTH_KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {list(TRUTH_KINDS)}")
        missing = {"user_id", "item_id"} - set(events.columns)
        if missing or events.empty:
            raise ValueError(f"events need rows with user_id and item_id; missing {sorted(missing)} "
                             f"or empty ({len(events)} rows)")
        users = events["user_id"].astype(str).to_numpy()
        items = events["item_id"].astype(str).to_numpy()
        item_ids = sorted(set(items))
        idx = pd.Index(item_ids, dtype=object).get_indexer(items) + 1  # 1-based: baselines keep 0 for padding
        order = np.argsort(users, kind="stable")
        users, idx = users[order], idx[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        seqs = np.split(idx.astype(np.int64), starts[1:])
        n = len(item_ids)
        if kind == "ease":
            params = {"l2": float(kw.get("l2", 500.0))}
            weights = EASE(**params).fit(seqs, n).weights[1:, 1:]
        else:
            params = {"k_neighbours": int(kw.get("k_neighbours", 100)), "shrink": float(kw.get("shrink", 0.0))}
            weights = ItemKNN(**params).fit(seqs, n).sim[1:, 1:]
        pairs = pd.DataFrame({"u": users, "i": idx - 1}).drop_duplicates()
        popularity = np.bincount(pairs["i"].to_numpy(), minlength=n).astype(np.float64)
        return cls(kind, item_ids, weights, popularity, params)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def encode(self, item_ids: Iterable[object]) -> np.ndarray:
        """(m,) int64 indices of the ids the truth knows (order kept, unknown ids -1)."""
        ids = [str(i) for i in item_ids]
        return self._index.get_indexer(ids).astype(np.int64) if ids else np.zeros(0, np.int64)

    def utilities(self, history: list[str]) -> np.ndarray:
        """Raw scores of every item after ``history`` (item ids, oldest first), (n_items,) float64.

        The sum of W's rows of the distinct known history items (the EASE / ItemKNN score of a
        binary history). A history without a known item (cold start) gets log(1 + popularity).
        """
        idx = np.unique(self.encode(history))
        idx = idx[idx >= 0]
        if not len(idx):
            return np.log1p(self.popularity)
        return self.weights[idx].sum(axis=0, dtype=np.float64)


@dataclass(frozen=True)
class Reaction:
    """A user's reaction to one slot of a slate.

    Attributes:
        item_id: the item shown.
        position: 1-based slot.
        action: "click" | "skip" (examined, not clicked, disliked: u < ``skip_below``) | "ignore" (not
            examined, or examined and neither clicked nor disliked).
    """

    item_id: str
    position: int
    action: str


@dataclass
class SessionResult:
    """One simulated session.

    Attributes:
        user_id, session: who and which session number.
        slates: slates shown (1..max_slates).
        shown: the item ids of each slate, in slot order.
        clicks, skips: totals over the session.
        clicks_by_position: (k,) int64 clicks per 1-based position (index p - 1).
        reactions: the reactions to each slate (one per slot).
        request_ids: the request id of each slate.
    """

    user_id: str
    session: int
    slates: int
    shown: list[list[str]]
    clicks: int
    skips: int
    clicks_by_position: np.ndarray
    reactions: list[list[Reaction]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    @property
    def slots(self) -> int:
        """Slots shown in the session (the denominator of CTR)."""
        return sum(len(s) for s in self.shown)


class UserSimulator:
    """Simulated users with a known taste (``GroundTruth``) who answer slates (module docstring).

    Args:
        truth: the fitted ground truth.
        histories: each simulated user's starting history (their lake history: positives, oldest
            first). The simulator keeps its own copy and appends clicked items.
        config: the parameters.
    Attributes:
        calibration: ``{"bias", "target_top_ctr", "achieved_top_ctr", "click_slope", "users",
            "method"}``: the calibrated logistic bias and the top-1 P(click | examined) it reaches,
            averaged over the calibration users.
    """

    def __init__(self, truth: GroundTruth, histories: Mapping[str, list[str]], config: SimConfig) -> None:
        self.truth = truth
        self.config = config
        self._histories: dict[str, list[str]] = {str(u): [str(i) for i in h] for u, h in histories.items()}
        self._consumed: dict[str, set[str]] = {u: set(h) for u, h in self._histories.items()}
        self._noise: dict[str, np.ndarray] = {}
        self._taste: dict[str, tuple[int, np.ndarray]] = {}
        self.bias = 0.0
        self.calibration = self._calibrate()

    # ---- state -----------------------------------------------------------------------------------------
    def users(self) -> list[str]:
        """The simulated users, in the order given."""
        return list(self._histories)

    def history(self, user_id: str) -> list[str]:
        """The user's history now (a copy): the starting history plus the clicks so far, oldest first."""
        return list(self._user(user_id))

    def consumed(self, user_id: str) -> set[str]:
        """The items the user will never click again (a copy of the history as a set)."""
        self._user(user_id)
        return set(self._consumed[user_id])

    def _user(self, user_id: str) -> list[str]:
        try:
            return self._histories[user_id]
        except KeyError:
            raise KeyError(f"user_id={user_id!r} is not simulated ({len(self._histories)} users)") from None

    def noise(self, user_id: str) -> np.ndarray:
        """The user's taste noise eps, (n_items,) N(0, 1), from ``default_rng([seed, stable_hash(user)])``."""
        eps = self._noise.get(user_id)
        if eps is None:
            self._user(user_id)
            rng = np.random.default_rng([self.config.seed, stable_hash(user_id)])
            eps = rng.standard_normal(self.truth.n_items)
            self._noise[user_id] = eps
        return eps

    def taste(self, user_id: str) -> np.ndarray:
        """u = standardize(truth.utilities(history)) + noise * eps, (n_items,) float64 (cached per history)."""
        history = self._user(user_id)
        cached = self._taste.get(user_id)
        if cached is not None and cached[0] == len(history):
            return cached[1]
        raw = self.truth.utilities(history)
        sd = float(raw.std())
        z = (raw - raw.mean()) / sd if sd > 0 else np.zeros_like(raw)
        u = z + self.config.noise * self.noise(user_id)
        self._taste[user_id] = (len(history), u)
        return u

    def _unseen_mask(self, user_id: str) -> np.ndarray:
        mask = np.ones(self.truth.n_items, dtype=bool)
        idx = self.truth.encode(self._consumed[user_id])
        mask[idx[idx >= 0]] = False
        return mask

    # ---- calibration -----------------------------------------------------------------------------------
    def _calibration_users(self) -> list[str]:
        users = sorted(self._histories, key=lambda u: (stable_hash(f"{self.config.seed}\x1f{u}"), u))
        return users[:CALIBRATION_USERS]

    def _calibrate(self) -> dict[str, Any]:
        cfg = self.config
        tops = []
        for user in self._calibration_users():
            u = np.where(self._unseen_mask(user), self.taste(user), -np.inf)
            if np.isfinite(u).any():
                tops.append(float(u.max()))
        top = np.asarray(tops, dtype=np.float64)
        if not len(top):
            self.bias = math.log(cfg.target_top_ctr / (1 - cfg.target_top_ctr))
            return {"bias": self.bias, "target_top_ctr": cfg.target_top_ctr, "achieved_top_ctr": None,
                    "click_slope": cfg.click_slope, "users": 0, "method": "no user to calibrate on: logit(target)"}

        def mean_ctr(b: float) -> float:
            return float(_sigmoid(cfg.click_slope * top + b).mean())

        lo, hi = _BIAS_RANGE
        for _ in range(_BISECTION_STEPS):  # mean_ctr increases with b
            mid = 0.5 * (lo + hi)
            if mean_ctr(mid) < cfg.target_top_ctr:
                lo = mid
            else:
                hi = mid
        self.bias = 0.5 * (lo + hi)
        return {"bias": self.bias, "target_top_ctr": cfg.target_top_ctr, "achieved_top_ctr": mean_ctr(self.bias),
                "click_slope": cfg.click_slope, "users": len(top),
                "mean_top_utility": float(top.mean()),
                "method": f"bisection on b over {_BIAS_RANGE}: mean over users of sigmoid(slope * u_top1 + b) "
                          "= target, u_top1 = the truth's own top-1 unseen item (noise included), starting "
                          f"histories, a seeded sample of up to {CALIBRATION_USERS} users"}

    # ---- reactions -------------------------------------------------------------------------------------
    def click_probabilities(self, user_id: str, slate: list[str]) -> np.ndarray:
        """P(click | examined) per slot, (len(slate),) float64: sigmoid(slope * u + b); 0 for an item
        consumed, unknown to the truth, or already shown earlier in this slate."""
        u = self.taste(user_id)
        consumed = self._consumed[user_id]
        idx = self.truth.encode(slate)
        out = np.zeros(len(slate), dtype=np.float64)
        earlier: set[str] = set()
        for j, (item, i) in enumerate(zip(slate, idx, strict=True)):
            item = str(item)
            if i >= 0 and item not in consumed and item not in earlier:
                out[j] = float(_sigmoid(self.config.click_slope * u[i] + self.bias))
            earlier.add(item)
        return out

    def disliked(self, user_id: str, slate: list[str]) -> np.ndarray:
        """(len(slate),) bool: the user dislikes the item (u < ``skip_below``; False for an item unknown to
        the truth, and everywhere when ``skip_below`` is None). Computed on the history before the slate."""
        threshold = self.config.skip_below
        idx = self.truth.encode([str(i) for i in slate])
        if threshold is None:
            self._user(user_id)
            return np.zeros(len(idx), dtype=bool)
        u = self.taste(user_id)
        return (idx >= 0) & (u[np.maximum(idx, 0)] < threshold)

    def examine_probabilities(self, n: int) -> np.ndarray:
        """P(examine position p) = examine_decay ** (p - 1) for p = 1..n, (n,)."""
        return self.config.examine_decay ** np.arange(n, dtype=np.float64)

    def _rng(self, user_id: str, session: int, step: int, stream: int) -> np.random.Generator:
        if session < 0 or step < 0:
            raise ValueError(f"session={session}, step={step}; expected >= 0")
        return np.random.default_rng([self.config.seed, stable_hash(user_id), int(session), int(step), stream])

    def respond(self, user_id: str, slate: list[str], session: int, step: int) -> list[Reaction]:
        """The user's reaction to each slot of ``slate`` (the ``step``-th slate, 0-based, of ``session``).

        Draws (stream 0): u_exam (n,) then u_click (n,); slot p is examined when u_exam < decay^(p-1)
        and clicked when also u_click < P(click | examined); an examined, not clicked item known to the
        truth is a "skip" when its utility u < ``skip_below`` (no draw: a dislike is deterministic given
        u), else "ignore". The clicked items are then appended to the user's history, in slot order.
        """
        slate = [str(i) for i in slate]
        n = len(slate)
        rng = self._rng(user_id, session, step, 0)
        u_exam, u_click = rng.random(n), rng.random(n)
        p_click = self.click_probabilities(user_id, slate)
        examined = u_exam < self.examine_probabilities(n)
        clicked = examined & (u_click < p_click)
        disliked = self.disliked(user_id, slate)
        reactions = [Reaction(item, pos + 1, "click" if c else ("skip" if e and d else "ignore"))
                     for pos, (item, e, c, d) in enumerate(zip(slate, examined, clicked, disliked, strict=True))]
        history, consumed = self._histories[user_id], self._consumed[user_id]
        for r in reactions:
            if r.action == "click":
                history.append(r.item_id)
                consumed.add(r.item_id)
        return reactions

    def continues(self, user_id: str, reactions: list[Reaction], session: int, step: int) -> bool:
        """Whether the session goes on after the slate ``step`` (one draw, stream 1)."""
        self._user(user_id)
        clicked = any(r.action == "click" for r in reactions)
        p = self.config.p_continue_click if clicked else self.config.p_continue_no_click
        return bool(self._rng(user_id, session, step, 1).random() < p)

    def run_session(self, user_id: str, recommend: Recommend, feedback: Feedback, session: int) -> SessionResult:
        """Up to ``max_slates`` slates: ask ``recommend(user_id, k) -> (item ids, request_id)``, react
        (``respond``), call ``feedback(user_id, reaction, request_id)`` for each click and skip (never
        for "ignore"), in slot order, and go on while ``continues``. An empty slate ends the session.
        """
        k = self.config.k
        result = SessionResult(user_id, session, 0, [], 0, 0, np.zeros(k, dtype=np.int64))
        for step in range(self.config.max_slates):
            items, request_id = recommend(user_id, k)
            items = [str(i) for i in items]
            if not items:
                break
            reactions = self.respond(user_id, items, session, step)
            result.slates += 1
            result.shown.append(items)
            result.reactions.append(reactions)
            result.request_ids.append(str(request_id))
            for r in reactions:
                if r.action == "ignore":
                    continue
                feedback(user_id, r, request_id)
                if r.action == "click":
                    result.clicks += 1
                    if r.position <= k:
                        result.clicks_by_position[r.position - 1] += 1
                else:
                    result.skips += 1
            if not self.continues(user_id, reactions, session, step):
                break
        return result


# ---- reference policies ------------------------------------------------------------------------------------


def _request_id(*parts: object) -> str:
    """A deterministic 32-hex request id (the service's format) for a reference policy's answer."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:32]


def truth_policy(sim: UserSimulator, user_id: str, k: int) -> list[str]:
    """The ground truth's own top-k unseen items for the user now (noise included: the user's u),
    ties by the lower truth index. An upper reference: no served model knows u."""
    u = np.where(sim._unseen_mask(user_id), sim.taste(user_id), -np.inf)
    n = int(min(k, np.isfinite(u).sum()))
    if n <= 0:
        return []
    top = np.lexsort((np.arange(len(u)), -u))[:n]
    return [sim.truth.item_ids[i] for i in top]


def truth_recommender(sim: UserSimulator) -> Recommend:
    """``truth_policy`` as a ``recommend(user_id, k) -> (items, request_id)`` callable."""
    calls: dict[str, int] = {}

    def recommend(user_id: str, k: int) -> tuple[list[str], str]:
        n = calls[user_id] = calls.get(user_id, 0) + 1
        return truth_policy(sim, user_id, k), _request_id("truth", user_id, n)

    return recommend


def popularity_policy(events: pd.DataFrame,
                      exclude: Callable[[str], Iterable[str]] | None = None) -> Recommend:
    """Most popular first (rows of ``events`` per ``item_id``, ties by item id), the same list for
    everyone except the items ``exclude(user_id)`` names (e.g. ``sim.consumed``)."""
    counts = events["item_id"].astype(str).value_counts()
    ranked = sorted(counts.index, key=lambda i: (-int(counts[i]), i))
    calls: dict[str, int] = {}

    def recommend(user_id: str, k: int) -> tuple[list[str], str]:
        n = calls[user_id] = calls.get(user_id, 0) + 1
        skip = set(exclude(user_id)) if exclude is not None else set()
        out = []
        for item in ranked:
            if item not in skip:
                out.append(item)
                if len(out) == k:
                    break
        return out, _request_id("popularity", user_id, n)

    return recommend


def random_policy(item_ids: Iterable[str], seed: int,
                  exclude: Callable[[str], Iterable[str]] | None = None) -> Recommend:
    """k distinct items drawn uniformly from ``item_ids`` minus ``exclude(user_id)``; the n-th call for a
    user draws from ``default_rng([seed, stable_hash(user_id), n])`` (independent of other users)."""
    catalogue = [str(i) for i in item_ids]
    calls: dict[str, int] = {}

    def recommend(user_id: str, k: int) -> tuple[list[str], str]:
        n = calls[user_id] = calls.get(user_id, 0) + 1
        skip = set(exclude(user_id)) if exclude is not None else set()
        pool = [i for i in catalogue if i not in skip]
        rng = np.random.default_rng([seed, stable_hash(user_id), n])
        pick = rng.choice(len(pool), size=min(k, len(pool)), replace=False) if pool else []
        return [pool[j] for j in pick], _request_id("random", seed, user_id, n)

    return recommend
