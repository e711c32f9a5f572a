"""Word lists and phrase pieces of the synthetic "reviews" corpus (see reviews.py).

Subjects come in four categories (food, products, media, places/services), each with its own
positive and negative adjectives on top of the shared ones, so most sentences make sense. The
rude words are deliberately mild (insults and swearing you would hear in a bad restaurant
review, nothing hateful).
"""

from __future__ import annotations


def _w(s: str) -> list[str]:
    """Splits a '|'-separated list of words or phrases."""
    return [w.strip() for w in s.split("|")]


CATEGORIES = {
    "food": {
        "subjects": _w(
            "the pizza|the pasta|the soup|the coffee|the burger|the salad|"
            "the dessert|the bread|the steak|the tacos|the sushi|the curry|"
            "the fries|the breakfast|the tea|the noodles|the cake|the wine"
        ),
        "verbs": _w("ordered|tried|had|ate|shared"),
        "pos": _w("tasty|delicious|fresh|flavorful|crispy|warm|rich"),
        "neg": _w("stale|bland|greasy|cold|soggy|salty|burnt|dry"),
    },
    "product": {
        "subjects": _w(
            "this phone|the laptop|the battery|the camera|these headphones|"
            "the charger|this blender|the keyboard|the screen|these shoes|"
            "the jacket|this backpack|the mattress|the vacuum|the speaker|"
            "the printer|this watch|the lamp"
        ),
        "verbs": _w("bought|used|ordered|tested|returned|got"),
        "pos": _w("sturdy|reliable|fast|comfortable|light|sleek|handy"),
        "neg": _w("flimsy|slow|broken|heavy|cheap|noisy|faulty|clunky"),
    },
    "media": {
        "subjects": _w(
            "the movie|this book|the show|the album|the game|the ending|the plot|"
            "the soundtrack|the acting|the first episode|the sequel|the podcast|"
            "the concert|the novel|the documentary|the trailer"
        ),
        "verbs": _w("watched|saw|finished|tried|checked out|started"),
        "pos": _w("funny|gripping|moving|clever|beautiful|thrilling|charming"),
        "neg": _w("boring|predictable|confusing|dull|silly|messy|forgettable"),
    },
    "place": {
        "subjects": _w(
            "the hotel|the staff|the service|the room|the waiter|the delivery|"
            "the app|the store|the gym|the airline|the driver|the front desk|"
            "this place|the clinic|the museum|the bakery|the support team"
        ),
        "verbs": _w("visited|tried|used|booked|called"),
        "pos": _w("friendly|helpful|clean|quick|cozy|welcoming|professional"),
        "neg": _w("rude|dirty|slow|crowded|unhelpful|chaotic|careless"),
    },
}
POSITIVE = _w(
    "good|great|excellent|amazing|wonderful|fantastic|lovely|nice|perfect|awesome|"
    "brilliant|superb|pleasant|solid|impressive|enjoyable|decent|outstanding|fun"
)
NEGATIVE = _w(
    "bad|terrible|awful|horrible|poor|disappointing|mediocre|useless|annoying|"
    "overpriced|weak|sad|painful|frustrating|lousy|ugly"
)
NEUTRAL = _w(
    "okay|fine|average|ordinary|normal|standard|typical|simple|small|new|different|"
    "quiet|basic|plain|as described"
)
INTENSIFIERS = _w(
    "very|really|extremely|so|incredibly|quite|pretty|super|totally|absolutely|"
    "seriously|truly|rather|a bit|kind of"
)
POS_VERBS = _w("loved|enjoyed|liked|adored|appreciated|really liked")
NEG_VERBS = _w("hated|disliked|regretted|could not stand|was annoyed by")
CONTEXTS = _w(
    "for the price|after a week|on a rainy sunday|with my family|for my birthday|"
    "last weekend|on the first day|after two months|with friends|at lunch|"
    "during the trip|this morning|for work|on a budget|after all the hype|"
    "for a change|late at night|with my kids|on the way home|at first"
)
OPENERS = _w(
    "honestly,|overall,|to be fair,|i have to say|well,|so,|first of all,|"
    "in short,|wow,|ugh,|hmm,|to be honest,|as expected,|surprisingly,|"
    "my wife said|my friend thinks|i think|for what it is worth,"
)
CLOSERS = {
    "pos": _w(
        "five stars|highly recommend|will come back|worth every penny|"
        "would buy again|a real gem|love it|ten out of ten|thank you|made my day|"
        "cannot wait to go back|best one so far"
    ),
    "neg": _w(
        "never again|avoid it|what a waste of money|one star|i want my money back|"
        "not worth it|so disappointed|do not buy|what a letdown|stay away|"
        "i expected better"
    ),
    "neu": _w(
        "nothing special|it is what it is|fair enough|your call|we will see|"
        "maybe next time|no complaints|could be better|about what i expected"
    ),
}
RECIPIENTS = _w("to anyone|to my friends|to families|to a friend|to everyone")
# Mild rudeness only.
RUDE_ADJ = _w("stupid|dumb|crappy|pathetic|damn")
RUDE_NOUN = _w("idiot|moron|garbage|trash|crap|junk|clown")
RUDE_CLAUSES_NEG = _w(
    "{subj} sucks|{subj} is total garbage|what a piece of junk|"
    "{subj} was a load of crap|whoever made {subj} is an idiot|"
    "what a {rude_adj} waste of time|{subj} is {rude_adj} and {neg}|"
    "the manager was a total {rude_noun}|this {rude_adj} thing broke|"
    "{subj} was trash"
)
RUDE_CLAUSES_POS = _w(
    "damn, {subj} was {pos}|holy crap, {subj} was {pos}|{subj} was damn {pos}|"
    "i was an idiot to wait this long|{subj} is stupid {pos}"
)
