"""The structured-answers run's workloads (bench/structured_answers.py, and the schemas of
bench/structured_output.py): 20 JSON schemas and 50 prompts to extract into them, regexes,
choices, pydantic models, tool functions and their prompts, and a validator to check answers.
"""

from __future__ import annotations

from typing import Any


def obj(**props: Any) -> dict[str, Any]:
    """An object with every property required and no other."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def text(max_length: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def integer(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def number(minimum: float, maximum: float, step: float) -> dict[str, Any]:
    """A bounded number in steps of `step` (0.01: money): without a step, a small model can
    write digits after the point until max_tokens."""
    return {"type": "number", "minimum": minimum, "maximum": maximum, "multipleOf": step}


def array(items: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "maxItems": max_items}


BOOLEAN = {"type": "boolean"}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": obj(name=text(40), age=integer(0, 120), occupation=text(30), nationality=text(20)),
    "product": obj(
        name=text(40),
        category=enum("electronics", "clothing", "kitchen", "toys", "books"),
        price=number(0, 10000, 0.01),
        in_stock=BOOLEAN,
        colors=array(text(12), 4),
    ),
    "event": obj(
        title=text(50),
        date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        city=text(30),
        kind=enum("concert", "conference", "festival", "match", "meeting"),
        attendees=integer(0, 100000),
    ),
    "recipe": obj(
        name=text(40),
        servings=integer(1, 12),
        minutes=integer(1, 600),
        difficulty=enum("easy", "medium", "hard"),
        ingredients=array(obj(item=text(25), grams=integer(1, 2000)), 5),
    ),
    "order": obj(
        order_id=text(12),
        customer=obj(name=text(30), email=text(40)),
        items=array(obj(sku=text(12), qty=integer(1, 99), unit_price=number(0, 1000, 0.01)), 3),
        status=enum("pending", "shipped", "delivered", "cancelled"),
    ),
    "review": obj(
        title=text(40),
        year=integer(1900, 2030),
        stars=integer(1, 5),
        sentiment=enum("positive", "negative", "mixed"),
        summary=text(80),
    ),
    "book": obj(
        title=text(50),
        author=text(40),
        year=integer(1400, 2030),
        genre=enum("novel", "poetry", "history", "science", "children", "other"),
        pages=integer(1, 5000),
    ),
    "address": obj(
        street=text(40),
        city=text(30),
        postal_code=text(10),
        country=enum("US", "UK", "FR", "DE", "JP", "other"),
    ),
    "flight": obj(
        airline=text(30),
        flight_number={"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,4}$"},
        origin={"type": "string", "pattern": "^[A-Z]{3}$"},
        destination={"type": "string", "pattern": "^[A-Z]{3}$"},
        minutes=integer(10, 1200),
    ),
    "weather": obj(
        city=text(30),
        temperature_c=number(-60, 60, 0.1),
        condition=enum("sunny", "cloudy", "rain", "snow", "storm", "fog"),
        humidity=integer(0, 100),
        wind_kmh=integer(0, 300),
    ),
    "job": obj(
        title=text(40),
        company=text(30),
        remote=BOOLEAN,
        salary=obj(
            low=integer(0, 1000000), high=integer(0, 1000000), currency=enum("USD", "EUR", "GBP")
        ),
        skills=array(text(20), 4),
    ),
    "company": obj(
        name=text(40),
        founded=integer(1800, 2030),
        employees=integer(1, 3000000),
        industry=enum("software", "retail", "energy", "finance", "health", "other"),
        headquarters=obj(city=text(30), country=text(30)),
    ),
    "contact": obj(
        name=text(40),
        phone=text(20),
        email=text(40),
        groups=array(enum("friend", "work", "family", "other"), 3),
    ),
    "match": obj(
        sport=enum("football", "basketball", "tennis", "rugby", "hockey"),
        home=text(30),
        away=text(30),
        home_score=integer(0, 200),
        away_score=integer(0, 200),
    ),
    "restaurant": obj(
        name=text(40),
        cuisine=enum("italian", "french", "japanese", "mexican", "indian", "other"),
        price_level=integer(1, 4),
        rating=number(0, 5, 0.1),
        open_days=array(enum(*DAYS), 7),
    ),
    "car": obj(
        make=text(20),
        model=text(20),
        year=integer(1900, 2030),
        fuel=enum("petrol", "diesel", "electric", "hybrid"),
        price_eur=integer(0, 500000),
    ),
    "song": obj(
        title=text(40),
        artist=text(40),
        album=text(40),
        seconds=integer(1, 3600),
        explicit=BOOLEAN,
    ),
    "booking": obj(
        hotel=text(40),
        guest=obj(first_name=text(20), last_name=text(20)),
        nights=integer(1, 60),
        room=enum("single", "double", "suite"),
        breakfast=BOOLEAN,
    ),
    "medication": obj(
        drug=text(30),
        dose_mg=number(0, 5000, 0.5),
        times_per_day=integer(1, 6),
        with_food=BOOLEAN,
    ),
    "ticket": obj(
        subject=text(60),
        priority=enum("low", "medium", "high", "urgent"),
        product=text(30),
        steps=array(text(40), 3),
    ),
}

# 50 prompts: (schema, text to extract from)
PROMPTS: list[tuple[str, str]] = [
    ("person", "Marie Curie was a 66-year-old Polish-born physicist when she died."),
    ("person", "Our new intern, Tom Baker, is 19 and studies chemistry in Leeds, England."),
    ("person", "Akira Tanaka, a Japanese chef aged 52, runs a noodle bar in Osaka."),
    ("product", "The Zephyr X2 headphones cost $199.99 and come in black, white and red."),
    ("product", "Sold out: a cast-iron skillet, 12 inches, priced at 45 dollars, grey."),
    ("product", "A wooden train set for kids, 30 pieces, $24.50, available now in blue."),
    ("event", "Rock in Rio takes place in Lisbon on 2025-06-21; 80000 fans are expected."),
    ("event", "The PyCon US conference opens on 2026-05-13 in Long Beach with 3000 people."),
    ("event", "Team meeting on 2025-01-08 in Berlin, twelve people attending."),
    ("recipe", "Pancakes for 4: 200 g flour, 300 g milk, 100 g eggs. Easy, 20 minutes."),
    ("recipe", "Beef stew serves 6, takes 150 minutes, medium: 800 g beef, 400 g carrots."),
    ("recipe", "Guacamole: 2 servings, 10 minutes, easy. 300 g avocado, 50 g onion, 20 g lime."),
    ("order", "Order A1023 from Jane Roe (jane@example.com): 2 x SKU-7 at 9.99, shipped."),
    ("order", "Bob Lee, bob@mail.net, ordered 1 lamp (L-55, 35.00). Order B77, still pending."),
    ("order", "Order C9 for Ann Wu, ann.wu@corp.org, 3 x P-1 at 4.50 each, was delivered."),
    ("review", "Inception (2010) is a mind-bending film, five stars, I loved every minute."),
    ("review", "The 1998 remake of Godzilla was loud and dull. One star from me."),
    ("review", "Dune (2021): stunning visuals but slow. Three stars, mixed feelings."),
    ("book", "Moby-Dick by Herman Melville, a novel published in 1851, runs 635 pages."),
    ("book", "A Brief History of Time, Stephen Hawking, 1988, about 256 pages of science."),
    ("address", "Send it to 221B Baker Street, London NW1 6XE, United Kingdom."),
    ("address", "The office is at 1600 Amphitheatre Parkway, Mountain View, CA 94043, USA."),
    ("address", "Write to 8 rue de Rivoli, 75004 Paris, France."),
    ("flight", "Flight AF1234 from Paris CDG to New York JFK takes 495 minutes."),
    ("flight", "Lufthansa LH400 leaves Frankfurt FRA for JFK; the trip is 540 minutes."),
    ("flight", "BA117, British Airways, London LHR to New York JFK, 480 minutes."),
    ("weather", "Oslo today: -3 degrees Celsius, snow, 85% humidity, wind 20 km/h."),
    ("weather", "Madrid is sunny at 31 C with 20 percent humidity and a light 5 km/h wind."),
    ("job", "Acme hires a remote Python developer, 90000 to 120000 USD, Django and SQL."),
    ("job", "Barista wanted at Bean Co, on site, 22000-26000 EUR, coffee skills."),
    ("company", "Siemens, founded in 1847 in Berlin, Germany, employs about 320000 people."),
    (
        "company",
        "Shopify is a Canadian retail software firm from Ottawa, founded 2006, 8000 staff.",
    ),
    ("contact", "Call Sarah Lee at +1 555 0100 or sarah@lee.dev; she is a work friend."),
    ("contact", "Uncle Max: max.k@family.org, phone 020 7946 0000, family."),
    ("match", "Real Madrid beat Barcelona 3-1 at home in football last night."),
    ("match", "In hockey, the Maple Leafs lost 2-4 at home to the Bruins."),
    ("match", "Basketball: Lakers 112, Celtics 108, played in Los Angeles."),
    ("restaurant", "Luigi's is an Italian place, price level 2, rated 4.5, open Tue to Sat."),
    ("restaurant", "Sushi Zen, Japanese, expensive (4), rating 4.8, open every day but Monday."),
    ("car", "A 2019 Tesla Model 3, electric, for 32000 euros."),
    ("car", "Used 2012 Volkswagen Golf, diesel, asking 7500 EUR."),
    ("song", "Bohemian Rhapsody by Queen, from A Night at the Opera, 354 seconds, not explicit."),
    ("song", "Lose Yourself by Eminem, on the 8 Mile soundtrack, 326 seconds, explicit."),
    ("booking", "Book the Ritz for John Smith: 3 nights, a double room, breakfast included."),
    ("booking", "Hotel Sakura, guest Yuki Sato, 1 night in a single room, no breakfast."),
    ("medication", "Take ibuprofen 400 mg three times a day with food."),
    ("medication", "Metformin 500 mg twice daily, taken with meals."),
    ("ticket", "Urgent: my Router Pro reboots every hour. I tried a reset and new firmware."),
    ("ticket", "Low priority: the Notes app font looks small. Changed settings, no luck."),
    ("ticket", "The billing page of Cloud Drive shows an error; I cleared my cache twice."),
]

# (name, pattern, prompt)
REGEXES: list[tuple[str, str, str]] = [
    ("date", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "On what date did Apollo 11 land on the Moon?"),
    ("phone", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", "Make up a US phone number."),
    (
        "email",
        r"[a-z]{1,12}\.[a-z]{1,12}@[a-z]{2,10}\.(com|org|net)",
        "Give Ada Lovelace an email.",
    ),
    ("time", r"([01][0-9]|2[0-3]):[0-5][0-9]", "What time do shops usually open?"),
    ("plate", r"[A-Z]{2}-[0-9]{3}-[A-Z]{2}", "Invent a French licence plate."),
    ("answer", r"(Yes|No), because [a-z ,]{5,60}\.", "Is the sea salty? Answer and say why."),
]

# (name, choices, prompt)
CHOICES: list[tuple[str, list[str], str]] = [
    ("sentiment", ["positive", "negative", "neutral"], "Sentiment of: 'I love this phone!'"),
    ("color", ["red", "green", "blue", "yellow"], "What color is the sky on a clear day?"),
    ("planet", ["Mercury", "Venus", "Earth", "Mars", "Jupiter"], "Which planet is the largest?"),
    ("language", ["Python", "Rust", "JavaScript", "C"], "Which language do browsers run?"),
    ("yes/no", ["yes", "no"], "Is Paris the capital of France?"),
]


def pydantic_models() -> list[tuple[type, str]]:
    """(model, prompt) pairs for `chat.completions.parse`."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=40)
        age: int = Field(ge=0, le=120)
        city: str = Field(max_length=30)

    class Movie(BaseModel):
        title: str = Field(max_length=40)
        year: int = Field(ge=1900, le=2030)
        genre: Literal["drama", "comedy", "action", "horror", "other"]

    class Item(BaseModel):
        name: str = Field(max_length=20)
        qty: int = Field(ge=1, le=99)

    class Basket(BaseModel):
        items: list[Item] = Field(max_length=3)
        paid: bool

    class Place(BaseModel):
        city: str = Field(max_length=40)
        country: str = Field(max_length=40)

    class Verdict(BaseModel):
        label: Literal["spam", "not_spam"]
        confidence: int = Field(ge=0, le=100)

    return [
        (Person, "Anna is 34 and lives in Vienna."),
        (Movie, "Alien (1979) is a horror classic by Ridley Scott."),
        (Basket, "I bought 2 apples and 1 bread and paid at the till."),
        (Place, "Where is the Eiffel Tower?"),
        (Verdict, "Classify: 'WIN A FREE CRUISE!!! Click now.'"),
    ]


TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "get_weather": (
        "The weather in a city.",
        obj(city=text(30), unit=enum("celsius", "fahrenheit")),
    ),
    "book_flight": (
        "Book a flight.",
        obj(
            origin={"type": "string", "pattern": "^[A-Z]{3}$"},
            destination={"type": "string", "pattern": "^[A-Z]{3}$"},
            passengers=integer(1, 9),
            cabin=enum("economy", "business", "first"),
        ),
    ),
    "create_event": (
        "Put an event in the calendar.",
        obj(title=text(40), day=enum(*DAYS), hour=integer(0, 23), invitees=array(text(20), 4)),
    ),
    "convert_currency": (
        "Convert an amount of money.",
        obj(
            amount=number(0, 1000000, 0.01),
            source=enum("USD", "EUR", "GBP", "JPY"),
            target=enum("USD", "EUR", "GBP", "JPY"),
        ),
    ),
}
TOOL_PROMPTS: list[tuple[str, str]] = [
    ("get_weather", "What is the weather like in Paris right now?"),
    ("get_weather", "Is it hot in Phoenix today, in fahrenheit?"),
    ("book_flight", "Book 2 business seats from JFK to LAX."),
    ("book_flight", "I need one economy ticket from Paris CDG to Tokyo HND."),
    ("create_event", "Schedule lunch with Ana and Raj on Friday at 12."),
    ("create_event", "Add a dentist appointment on Monday at 9."),
    ("convert_currency", "How much is 100 dollars in euros?"),
    ("convert_currency", "Convert 2500 yen to pounds."),
]


def tool_specs() -> list[dict[str, Any]]:
    return [
        {"type": "function",
         "function": {"name": name, "description": description, "parameters": parameters}}
        for name, (description, parameters) in TOOLS.items()
    ]  # fmt: skip


def make_validator(schema: dict[str, Any]) -> Any:
    """jsonschema's Draft 2020-12 validator, with `multipleOf` checked in decimal: 151.01 is a
    multiple of 0.01, which binary floats (jsonschema's own check) deny."""
    from decimal import Decimal

    import jsonschema

    def multiple_of(validator: Any, step: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "number"):
            return
        try:
            rest = Decimal(str(instance)) % Decimal(str(step))
        except ArithmeticError:  # infinity, or too many digits to divide
            rest = Decimal(1)
        if rest:
            yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step}")

    validator = jsonschema.validators.extend(
        jsonschema.Draft202012Validator, {"multipleOf": multiple_of}
    )
    return validator(schema)
