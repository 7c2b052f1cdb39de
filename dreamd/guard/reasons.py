"""How the guard's reasons combine (pure; dreamd/workers/guard.py acts on the result). A
rule that senses its cause holds a reason while the cause lasts and for the rule's delay
after it was last seen, so a click on the taskbar does not flap the pause; the guard's
pause lasts while any reason is held, and one reason ending never ends another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACTIONS = ("keep", "pause", "free")     # keep: the rule is off; free: pause and free the GPU
# The order reasons are named in: what a user most needs to know first
RULES = ("earlier", "game", "gpu", "fullscreen", "battery", "saver", "locked")


@dataclass(frozen=True)
class Sensed:
    text: str           # words a user reads: "on battery", "a full-screen window: vlc.exe"
    action: str         # pause | free
    delay: float        # seconds the cause must have been gone before the reason ends


@dataclass
class Held:
    rule: str
    text: str
    action: str
    delay: float
    last_seen: float

    def ended(self) -> str:
        return f"{self.text}: over for {self.delay:g} s"


@dataclass
class Change:
    added: list[Held] = field(default_factory=list)
    ended: list[Held] = field(default_factory=list)
    before: str | None = None       # the words of the reasons held before the update
    words: str | None = None        # ...and after

    @property
    def frees(self) -> bool:
        """A rule that asks for the GPU back engaged now."""
        return any(h.action == "free" for h in self.added)


class Reasons:
    def __init__(self) -> None:
        self.held: dict[str, Held] = {}

    def words(self) -> str | None:
        """All reasons held, in RULES order: "a game: bg3.exe; on battery"."""
        texts = [self.held[r].text for r in sorted(self.held, key=_rank)]
        return "; ".join(texts) or None

    def hold(self, rule: str, sensed: Sensed, now: float) -> None:
        """Hold a reason that was not sensed this tick (the pause an earlier run left)."""
        self.held[rule] = Held(rule, sensed.text, sensed.action, sensed.delay, now)

    def update(self, sensed: dict[str, Sensed], now: float) -> Change:
        """What was sensed at `now` (rule -> Sensed, rules whose action is keep left out):
        reasons added, reasons whose cause has been gone for their delay ended."""
        change = Change(before=self.words())
        for rule, s in sensed.items():
            held = self.held.get(rule)
            if held is None:
                self.held[rule] = held = Held(rule, s.text, s.action, s.delay, now)
                change.added.append(held)
            else:       # the same cause, perhaps in other words (a second game started)
                held.text, held.action, held.delay, held.last_seen = (s.text, s.action,
                                                                      s.delay, now)
        for rule, held in list(self.held.items()):
            if rule not in sensed and now - held.last_seen >= held.delay:
                change.ended.append(self.held.pop(rule))
        change.words = self.words()
        return change

    def clear(self) -> Change:
        """Every reason ends at once (the guard was turned off)."""
        change = Change(before=self.words(), ended=list(self.held.values()))
        self.held.clear()
        return change


def _rank(rule: str) -> int:
    return RULES.index(rule) if rule in RULES else len(RULES)
