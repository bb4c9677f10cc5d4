"""Writes data/demo/train.jsonl: a small instruction set for the sftflow demo.

The skill: read a short free-text note about a person and answer with one line of compact
JSON, keys in a fixed order, adding the city's ISO 3166 country code:
{"name": ..., "age": ..., "city": ..., "country": "PT"}. SmolLM2-135M-Instruct extracts the
fields but pretty-prints them, drops or misnames the country, and often gets its code wrong,
so exact match starts near 0. Deterministic: rerunning writes the same file.

Each record also names its city's region (`region`), the slice column the nightly story's
gate scores separately. `night2.jsonl` is the second night's new data: 300 more records
from another seed.
"""

import json
import random
from pathlib import Path

FIRST = [
    "Maria",
    "Ana",
    "Jonas",
    "Priya",
    "Kenji",
    "Lucia",
    "Omar",
    "Fatima",
    "Lars",
    "Ingrid",
    "Tomas",
    "Chen",
    "Aisha",
    "Pedro",
    "Nora",
    "Ivan",
    "Sofia",
    "Mateo",
    "Lea",
    "Hugo",
    "Amara",
    "Rafael",
    "Elena",
    "Yusuf",
    "Mei",
    "Diego",
    "Hana",
    "Olga",
    "Samir",
    "Clara",
    "Felix",
    "Zara",
    "Emil",
    "Rosa",
    "Tariq",
    "Greta",
    "Luca",
    "Noor",
    "Pablo",
    "Vera",
    "Kofi",
    "Alma",
    "Bruno",
    "Leila",
    "Oskar",
    "Ines",
    "Malik",
    "Freya",
    "Arjun",
    "Selma",
]
LAST = [
    "Silva",
    "Novak",
    "Weber",
    "Sharma",
    "Tanaka",
    "Rossi",
    "Haddad",
    "Ali",
    "Berg",
    "Larsen",
    "Horvat",
    "Wang",
    "Okafor",
    "Costa",
    "Petrov",
    "Moreno",
    "Dubois",
    "Kowalski",
    "Ibrahim",
    "Nakamura",
    "Jensen",
    "Fischer",
    "Lopez",
    "Mensah",
    "Varga",
    "Kim",
    "Schmidt",
    "Ortiz",
    "Lindqvist",
    "Gupta",
]
COUNTRY = {
    "Lisbon": "PT",
    "Porto": "PT",
    "Prague": "CZ",
    "Berlin": "DE",
    "Munich": "DE",
    "Hamburg": "DE",
    "Mumbai": "IN",
    "Pune": "IN",
    "Osaka": "JP",
    "Kyoto": "JP",
    "Rome": "IT",
    "Beirut": "LB",
    "Cairo": "EG",
    "Oslo": "NO",
    "Bergen": "NO",
    "Zagreb": "HR",
    "Shanghai": "CN",
    "Lagos": "NG",
    "Kyiv": "UA",
    "Madrid": "ES",
    "Seville": "ES",
    "Lyon": "FR",
    "Warsaw": "PL",
    "Nairobi": "KE",
    "Aarhus": "DK",
    "Accra": "GH",
    "Budapest": "HU",
    "Seoul": "KR",
    "Bogota": "CO",
    "Uppsala": "SE",
    "Toronto": "CA",
    "Dublin": "IE",
    "Vienna": "AT",
    "Quito": "EC",
    "Tunis": "TN",
    "Helsinki": "FI",
    "Lima": "PE",
    "Hanoi": "VN",
    "Perth": "AU",
    "Denver": "US",
}
CITIES = sorted(COUNTRY)
ASIA_PACIFIC = {"IN", "JP", "LB", "CN", "KR", "VN", "AU"}
AFRICA_AMERICAS = {"EG", "NG", "KE", "GH", "TN", "CO", "CA", "EC", "PE", "US"}


def region(country: str) -> str:
    if country in ASIA_PACIFIC:
        return "Asia-Pacific"
    return "Africa & Americas" if country in AFRICA_AMERICAS else "Europe"


JOBS = [
    "nurse",
    "baker",
    "teacher",
    "pilot",
    "architect",
    "chemist",
    "carpenter",
    "journalist",
    "librarian",
    "engineer",
    "farmer",
    "dentist",
    "painter",
    "lawyer",
    "plumber",
    "photographer",
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}, working as a {job}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{name} ({age}) moved to {city} last spring to work as a {job}.",
    "Our new {job}, {name}, is {age} and commutes every day in {city}.",
    "Born {age} years ago, {name} now runs a small studio in {city} as a {job}.",
    "In {city}, {name}, aged {age}, has been a {job} for a decade.",
    "The {job} {name} turned {age} this week and celebrated in {city}.",
    "{name} says that at {age}, life as a {job} in {city} is never boring.",
    "Customer record: {name}, {age}, {job}, based in {city}.",
    "After years abroad, {name} ({age}, {job}) returned home to {city}.",
    "{city} is home to {name}, a {job} who is {age}.",
    "Age {age}. Occupation: {job}. Name: {name}. Lives in {city}.",
]
INSTRUCTIONS = [
    "Extract the person's name, age and city as JSON, with the city's ISO country code.",
    "Return a JSON object with the name, age, city and country code of the person described.",
    "Read the note and give name, age, city and the two-letter country code in JSON.",
    "Pull out the name, age, city and ISO country code. Answer with JSON only.",
]


def main(name: str = "train.jsonl", n: int = 400, seed: int = 7) -> None:
    rng = random.Random(seed)
    out = Path(__file__).with_name(name)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(n):
            city = rng.choice(CITIES)
            person = {
                "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                "age": rng.randint(19, 78),
                "city": city,
            }
            text = rng.choice(TEMPLATES).format(job=rng.choice(JOBS), **person)
            person["country"] = COUNTRY[city]
            record = {
                "instruction": rng.choice(INSTRUCTIONS),
                "input": text,
                "output": json.dumps(person, ensure_ascii=False),
                "region": region(person["country"]),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {n} records to {out}")


if __name__ == "__main__":
    main()
    main("night2.jsonl", n=300, seed=8)
