"""Build tunelab/data/builtin/general_probes.json: the general-knowledge probes that the `forgetting`
diagnostic asks before and after fine-tuning.

    python -m tunelab.diagnostics.build_probes [--model smollm2-135m] [--max-probes 64] [--out PATH]

How: every candidate below (a short factual question with short unambiguous answers: capitals,
opposites, colours, small sums in words, counts, sequences, animals, common facts) is asked to the
base model by greedy decoding; a candidate is kept when the reply contains one of its answers as a
whole word. The kept ones are taken round-robin across categories, in table order, up to
`--max-probes`. The kept set is then asked again in every conjugate form (tunelab.diagnostics.
_transforms) and the base model's accuracy per form is recorded, so the default form can be chosen
on evidence. The file's "meta" records the model, decoding, date and counts.
"""
from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict
from pathlib import Path

_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Canada", "Ottawa"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Kenya", "Nairobi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Turkey", "Ankara"), ("Australia", "Canberra"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("Vietnam", "Hanoi"), ("Venezuela", "Caracas"), ("Syria", "Damascus"), ("Saudi Arabia", "Riyadh"),
    ("Afghanistan", "Kabul"), ("Scotland", "Edinburgh"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("India", "New Delhi|Delhi"), ("Colombia", "Bogota|Bogotá"), ("Ukraine", "Kyiv|Kiev"),
]
_OPPOSITES = [  # no yes/no or left/right: "no" and "right" occur in too many replies that are not answers
    ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("day", "night"), ("black", "white"),
    ("open", "closed|close|shut"), ("happy", "sad|unhappy"), ("wet", "dry"),
    ("tall", "short"), ("full", "empty"), ("early", "late"), ("rich", "poor"), ("strong", "weak"),
    ("win", "lose"), ("push", "pull"), ("inside", "outside"), ("thick", "thin"), ("true", "false"),
    ("loud", "quiet|soft"), ("north", "south"), ("east", "west"), ("love", "hate"), ("alive", "dead"),
    ("buy", "sell"), ("first", "last"), ("high", "low"), ("above", "below|beneath|under"), ("big", "small|little"),
    ("old", "young|new"), ("hard", "soft|easy"), ("good", "bad|evil"), ("light", "dark|heavy"),
]
_COLOURS = [
    ("the sky on a clear day", "blue"), ("grass", "green"), ("a ripe banana", "yellow"), ("snow", "white"),
    ("coal", "black"), ("blood", "red"), ("a ripe tomato", "red"), ("a carrot", "orange"),
    ("milk chocolate", "brown"), ("a lemon", "yellow"), ("fresh milk", "white"), ("a strawberry", "red"),
    ("a leaf in summer", "green"), ("the sea", "blue"), ("a crow", "black"),
]
_SUMS = [
    ("two plus three", "five|5"), ("one plus one", "two|2"), ("three plus four", "seven|7"),
    ("ten minus four", "six|6"), ("two times three", "six|6"), ("five plus five", "ten|10"),
    ("nine minus two", "seven|7"), ("four times two", "eight|8"), ("six plus two", "eight|8"),
    ("ten divided by two", "five|5"), ("three times three", "nine|9"), ("eight minus five", "three|3"),
    ("four plus four", "eight|8"), ("seven plus one", "eight|8"), ("twenty minus ten", "ten|10"),
    ("two plus two", "four|4"),
]
_COUNTS = [
    ("legs does a spider have", "eight|8"), ("legs does a dog have", "four|4"),
    ("days are in a week", "seven|7"), ("months are in a year", "twelve|12"),
    ("hours are in a day", "24|twenty-four|twenty four"), ("minutes are in an hour", "60|sixty"),
    ("sides does a triangle have", "three|3"), ("sides does a square have", "four|4"),
    ("wheels does a bicycle have", "two|2"), ("legs does an insect have", "six|6"),
    ("continents are there on Earth", "seven|7"), ("days are in a leap year", "366"),
    ("fingers are on one hand", "five|5"), ("players are on a soccer team on the field", "eleven|11"),
    ("seconds are in a minute", "60|sixty"), ("sides does a hexagon have", "six|6"),
]
_SEQUENCES = [
    ("month comes after March", "April"), ("day comes after Monday", "Tuesday"),
    ("month comes before December", "November"), ("day comes before Friday", "Thursday"),
    ("season comes after winter", "spring"), ("month comes after January", "February"),
    ("day comes after Saturday", "Sunday"), ("season comes after summer", "autumn|fall"),
    ("month comes after June", "July"), ("number comes after nine", "ten|10"),
]
_OPEN = [
    ("animals", "Which animal barks?", "dog|dogs"), ("animals", "What sound does a cow make?", "moo"),
    ("animals", "What is a baby cat called?", "kitten"), ("animals", "What is a baby dog called?", "puppy"),
    ("animals", "What is the largest animal on Earth?", "blue whale"),
    ("animals", "What is the fastest land animal?", "cheetah"),
    ("animals", "Which bird cannot fly and lives in Antarctica?", "penguin|penguins"),
    ("animals", "Which animal is called the king of the jungle?", "lion"),
    ("animals", "Which animal has a long trunk?", "elephant|elephants"),
    ("animals", "Which animal makes honey?", "bee|bees|honeybee|honeybees"),
    ("facts", "At what temperature in Celsius does water freeze?", "0|zero"),
    ("facts", "At what temperature in Celsius does water boil?", "100|one hundred"),
    ("facts", "What is the largest planet in our solar system?", "Jupiter"),
    ("facts", "On which planet do we live?", "Earth"),
    ("facts", "Who wrote Romeo and Juliet?", "Shakespeare"),
    ("facts", "Who painted the Mona Lisa?", "Leonardo|da Vinci"),
    ("facts", "What is the chemical formula of water?", "H2O"),
    ("facts", "What gas do plants absorb from the air?", "carbon dioxide|CO2"),
    ("facts", "What is the largest ocean on Earth?", "Pacific"),
    ("facts", "What is the tallest mountain in the world?", "Everest"),
    ("facts", "What is the currency of Japan?", "yen"),
    ("facts", "What language is spoken in Brazil?", "Portuguese"),
    ("facts", "What language is spoken in Mexico?", "Spanish"),
    ("facts", "What is frozen water called?", "ice"),
    ("facts", "Which star is at the centre of our solar system?", "the Sun|Sun"),
    ("facts", "What do we call the natural satellite of the Earth?", "the Moon|Moon"),
    ("facts", "Which organ pumps blood through the body?", "heart"),
    ("facts", "What do you call a shape with four equal sides and four right angles?", "square"),
]


def candidates() -> list[dict]:
    """Every candidate probe as {question, answers, category}, in table order."""
    rows = [("capital", f"What is the capital of {c}?", a) for c, a in _CAPITALS]
    rows += [("opposite", f"What is the opposite of {w}?", a) for w, a in _OPPOSITES]
    rows += [("colour", f"What colour is {t}?", a) for t, a in _COLOURS]
    rows += [("arithmetic", f"What is {s}?", a) for s, a in _SUMS]
    rows += [("count", f"How many {s}?", a) for s, a in _COUNTS]
    rows += [("sequence", f"Which {s}?", a) for s, a in _SEQUENCES]
    rows += _OPEN
    return [{"question": q, "answers": a.split("|"), "category": cat} for cat, q, a in rows]


def round_robin(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` rows, taking one per category in turn (categories in order of first
    appearance, rows in table order), so no category crowds out the others."""
    queues: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        queues[r["category"]].append(r)
    out: list[dict] = []
    while len(out) < limit and any(queues.values()):
        for q in queues.values():
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def build(model_name: str, max_probes: int, max_new_tokens: int) -> dict:
    """Ask the base model every candidate; return the probes file's contents."""
    from tunelab.diagnostics._generation import cached, chat_answerer
    from tunelab.diagnostics._probes import Probe, score
    from tunelab.diagnostics._transforms import TRANSFORMS
    from tunelab.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name=model_name))
    ask = cached(chat_answerer(model, tok, max_new_tokens=max_new_tokens))
    cands = candidates()
    probes = [Probe(r["question"], tuple(r["answers"]), r["category"]) for r in cands]
    correct = score(ask([p.question for p in probes]), probes)
    print(f"{sum(correct)} of {len(cands)} candidates answered correctly", flush=True)
    kept = round_robin([r for r, ok in zip(cands, correct) if ok], max_probes)
    kept_probes = [Probe(r["question"], tuple(r["answers"]), r["category"]) for r in kept]
    conjugate = {}
    for name, t in TRANSFORMS.items():
        if name != "identity":
            hits = score(ask([t.forward(p.question) for p in kept_probes]), kept_probes, t.inverse)
            conjugate[name] = round(sum(hits) / max(len(hits), 1), 4)
    meta = {"model": model_name, "decoding": f"greedy, max_new_tokens={max_new_tokens}, chat template, "
                                             "user turn only",
            "scoring": "a reply is correct if it contains an answer as a whole word (case-insensitive)",
            "date": datetime.date.today().isoformat(), "candidates_tried": len(cands),
            "candidates_correct": sum(correct), "kept": len(kept),
            "kept_per_category": {c: sum(r["category"] == c for r in kept)
                                  for c in dict.fromkeys(r["category"] for r in cands)},
            "base_accuracy_by_conjugate_form": conjugate,
            "builder": "python -m tunelab.diagnostics.build_probes"}
    return {"meta": meta, "probes": kept}


def main(argv: list[str] | None = None) -> None:
    from tunelab.diagnostics._probes import BUILTIN_PROBES
    from tunelab.run.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-probes", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default=str(BUILTIN_PROBES))
    a = p.parse_args(argv)
    data = build(a.model, a.max_probes, a.max_new_tokens)
    atomic_write_text(Path(a.out), json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(data["meta"], indent=1))


if __name__ == "__main__":
    main()
