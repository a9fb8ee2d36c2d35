"""Generated training phrasings for the word problems: frames with alternatives, expanded.

A *frame* is a question and an answer over the operand slots (``{a}`` ..), ``{item}`` and (answer)
``{r}``, in which ``[x|y|z]`` offers alternatives. :func:`expand` gives every combination of a
frame's question alternatives (each paired with one of its answer alternatives, in turn), and
:func:`generated_templates` draws up to ``per_frame`` of them per frame with a fixed seed, so
the training phrasings are a pure function of the frames.

The frames vary what the held-out phrasings vary: the verbs of each operation, the order in which
the operands are named (the result before its parts, the divisor first, the added amount first),
imperative and question-first sentences, one or several sentences. None of them is a held-out
phrasing (``tests/compute/test_llm_chain.py`` checks that no held-out clause of more than four
words occurs in a training question).
"""

from __future__ import annotations

import itertools
import random
import re

from pimoe.compute.word_templates import PATTERNS, Template

FIRST_ROUND = 40  # FRAMES[:FIRST_ROUND] are the first round of frames; the rest came later
_ALTERNATIVES = re.compile(r"\[([^\[\]]*)\]")

# (pattern index, question frame, answer frame)
FRAMES: tuple[tuple[int, str, str], ...] = (
    # {a}-{b}+{c}
    (
        0,
        "[Nina|Omar|A seller|The club] [had|owned|started with] {a} {item}, [gave away|lost|used up|traded] {b} "
        "and [got|bought|was given|picked up] {c} [more|new ones]. How many {item} [now|are there now]?",
        "[There are now {r} {item}.|Now there are {r} {item}.]",
    ),
    (
        0,
        "[First|At noon] {b} {item} were [removed|taken out|sold], then {c} were [added|brought in]; "
        "[at the start|in the morning] the [bin|stall|room] held {a}. How many {item} does it hold?",
        "[It holds {r} {item}.|The count is {r} {item}.]",
    ),
    (
        0,
        "[Take|Start from] {a} {item}, [remove|subtract|take away] {b}, then [add|put back|include] {c}. "
        "How many {item} [is that|do you get]?",
        "[That is {r} {item}.|You get {r} {item}.]",
    ),
    (
        0,
        "How many {item} [remain|are kept] if {c} [arrive|come in] after {b} [leave|are handed out] "
        "from [a stock|a pile|a collection] of {a}?",
        "[{r} {item} are kept.|The stock is {r} {item}.]",
    ),
    (
        0,
        "[A baker|Kim|A depot] [stocked|kept|held] {a} {item}. [Then|Later] {b} [disappeared|vanished|were stolen] "
        "and {c} [arrived|turned up|were delivered]. [How many {item} are there at the end|What is the end count]?",
        "[At the end there are {r} {item}.|The end count is {r}.]",
    ),
    # {a}*{b}+{c}
    (
        1,
        "[Nina|Omar|A grocer] [fills|packs|stacks] {a} [crates|bags|rows] with {b} {item} [in each|per one] "
        "and [also has|keeps] {c} [loose|extra|spare] {item}. How many {item} [is that|in all]?",
        "[That makes {r} {item}.|In all {r} {item}.]",
    ),
    (
        1,
        "[On top of|Along with|Next to] {c} [single|leftover] {item}, there are {b} {item} in each of {a} "
        "[cartons|baskets|drawers]. [How many|What total of] {item} [are there|is that]?",
        "[There are {r} {item}.|The total is {r} {item}.]",
    ),
    (
        1,
        "[Count|Find] the {item}: {a} [tubes|cases|cans] [contain|carry] {b} each, [plus|and there are] {c} "
        "[more|others].",
        "[The count is {r} {item}.|There are {r} {item}.]",
    ),
    (
        1,
        "[What is the total|How many {item} are there] when {a} [groups|batches] [of|with] {b} {item} "
        "[are joined by|get] {c} [more|additional] {item}?",
        "[The total is {r} {item}.|There are {r} {item}.]",
    ),
    (
        1,
        "[Kim|A florist|The depot] [set out|lined up|prepared] {a} [pots|packets|racks] of {b} {item} [apiece|each] "
        "[as well as|together with] {c} [stray|extra] {item}. [How many {item} is that in total|What is the total]?",
        "[In total that is {r} {item}.|The total is {r}.]",
    ),
    # {a}*{b}-{c}
    (
        2,
        "[Nina|Omar|A mill] [made|produced|packed] {a} [boxes|batches|bundles] of {b} {item} [each|], "
        "[but|and then] {c} {item} were [lost|damaged|spoiled|returned]. How many {item} [are left|remain|are good]?",
        "[{r} {item} are left.|There are {r} good {item}.]",
    ),
    (
        2,
        "[Once|After|When] {c} {item} are [sold|taken|removed], how many [are left|stay] [out of|from] {a} "
        "[trays|sacks|shelves] [holding|with] {b} {item} each?",
        "[{r} {item} stay.|There are {r} {item} left.]",
    ),
    (
        2,
        "[Fill|Load] {a} [jars|bins] with {b} {item} [each|per jar] and [then remove|take out] {c} {item}. "
        "[How many {item} are left|What remains]?",
        "[{r} {item} are left.|What remains is {r} {item}.]",
    ),
    (
        2,
        "There [were|are] {b} {item} in every one of {a} [rooms|carts|cases]; {c} of them [broke|were thrown away]. "
        "How many {item} [are fine|can be used]?",
        "[{r} {item} are fine.|{r} {item} can be used.]",
    ),
    (
        2,
        "[Kim|A baker|The depot] [stocked|loaded] {a} [tins|pallets|cups] [holding|with] {b} {item} [apiece|each]; "
        "[later|then] {c} {item} [disappeared|vanished|were stolen|went bad]. How many {item} [are still there|survive]?",
        "[{r} {item} are still there.|{r} {item} survive.]",
    ),
    # ({a}+{b})*{c}
    (
        3,
        "[Nina|Omar|A team] [bought|ordered|needs] {a} [big|blue] and {b} [small|red] {item}, and [each one|every one] "
        "[costs|weighs] {c} [dollars|grams]. [What is the total|How much is that]?",
        "[The total is {r}.|That is {r}.]",
    ),
    (
        3,
        "[Every one of the|Each of the] {item} [is worth|sells for] {c} dollars. [A stall|One shop] has {a} and [another|a second] has {b}. "
        "[How much are they worth|What is the total value]?",
        "[They are worth {r} dollars.|The total value is {r} dollars.]",
    ),
    (
        3,
        "[Add|Sum up] {a} and {b} {item}, then [multiply the sum by|take the sum times] {c}. What [do you get|is the result]?",
        "[You get {r}.|The result is {r}.]",
    ),
    (
        3,
        "How [much|many dollars] [do|will] {a} [old|adult] plus {b} [new|young] {item} [cost|bring] at {c} dollars "
        "[per {item}|a piece]?",
        "[They cost {r} dollars.|That brings {r} dollars.]",
    ),
    (
        3,
        "[Kim|A vendor] sold {a} {item} in the [morning|forenoon] and {b} in the [evening|night], [for|at] {c} "
        "[coins|dollars] [apiece|each]. [How much did that bring in|What were the sales worth]?",
        "[That brought in {r}.|The sales were worth {r}.]",
    ),
    # ({a}-{b})/{c}
    (
        4,
        "[Nina|Omar|A coach] [had|kept] {a} {item}, [threw out|lost|sold] {b} and [divided|split|shared] the [rest|remainder] "
        "[equally|evenly] [among|between] {c} [players|boxes|days]. How many {item} [each|does each get]?",
        "[Each gets {r} {item}.|That is {r} {item} each.]",
    ),
    (
        4,
        "[Split|Share] [equally|evenly] [among|across] {c} [kids|teams|weeks]: {a} {item} [minus|less] the {b} that "
        "[broke|were used]. How many [per one|does each get]?",
        "[Each gets {r} {item}.|{r} {item} per one.]",
    ),
    (
        4,
        "[When|After] {b} of {a} {item} are [taken|removed|given away], the [rest|others] go [equally|evenly] into {c} "
        "[bags|rows|piles]. How many {item} [per bag|in each]?",
        "[There are {r} {item} in each.|Each holds {r} {item}.]",
    ),
    (
        4,
        "[There are|We have] {c} [groups|boxes] to fill [equally|evenly] from {a} {item}, [after|once] {b} "
        "[are set aside|spoil]. How many {item} [go in each|per group]?",
        "[{r} {item} go in each.|Each group gets {r} {item}.]",
    ),
    (
        4,
        "[Kim|A baker|The depot] [began with|stocked] {a} {item}; {b} [vanished|were stolen|went bad]. The "
        "[others|remaining ones] were [handed out|given] [in equal parts|equally] to {c} [guests|classes|stores]. "
        "[What did each receive|How many {item} did each receive]?",
        "[Each received {r} {item}.|Each one received {r}.]",
    ),
    # {a}*{b}*{c}
    (
        5,
        "[A depot|A school|Nina] has {a} [buildings|carts|boxes]; each [holds|has] {b} [bins|shelves|bags] and each of "
        "those [holds|has] {c} {item}. How many {item} [in total|are there]?",
        "[There are {r} {item}.|In total {r} {item}.]",
    ),
    (
        5,
        "[Every bag holds {c} {item}, every box holds {b} bags, and there are {a} boxes|Each tray has {c} {item}, "
        "each crate has {b} trays, and there are {a} crates]. How many {item} [are there|in all]?",
        "[There are {r} {item}.|In all {r} {item}.]",
    ),
    (
        5,
        "[Multiply|Count up]: {a} [towns|farms] [with|having] {b} [barns|sheds] [each|in each], and {c} {item} in "
        "every [barn|shed]. [Total|How many {item}]?",
        "[The total is {r}.|There are {r} {item}.]",
    ),
    (
        5,
        "How many {item} are [stored|kept] [when|if] {a} [vans|ships] carry {b} [cases|crates] each with {c} {item} "
        "[inside|in every one]?",
        "[{r} {item} are stored.|They keep {r} {item}.]",
    ),
    (
        5,
        "[Kim|A museum] [owns|runs] {a} [wings|vans], [every|each] one [with|holding] {b} [cabinets|cases], and "
        "[every|each] [cabinet|case] [contains|stores] {c} {item}. How many {item} [does it have|are in them]?",
        "[It has {r} {item}.|{r} {item} are in them.]",
    ),
    # {a}+{b}+{c}-{d}
    (
        6,
        "[Nina|Omar|A farm] [got|collected|earned] {a}, {b} and {c} {item} [on three days|in three rounds] and "
        "[spent|lost|gave away] {d}. How many {item} [are left|remain]?",
        "[{r} {item} are left.|There remain {r} {item}.]",
    ),
    (
        6,
        "[Take away|Remove|Subtract] {d} from the [sum|total] of {a}, {b} and {c} {item}. [What is left|How many remain]?",
        "[What is left is {r}.|{r} remain.]",
    ),
    (
        6,
        "[Of|From] the {a}, {b} and {c} {item} [that came in|delivered] [this week|so far], {d} were [returned|broken]. "
        "How many {item} [are kept|stay]?",
        "[{r} {item} are kept.|{r} {item} stay.]",
    ),
    (
        6,
        "[How many|What number of] {item} [are left|remain] [when|if] {d} [are sold|go] from [stacks|heaps] of {a}, {b} "
        "and {c}?",
        "[{r} {item} are left.|{r} remain.]",
    ),
    (
        6,
        "[Kim|A museum|The depot] [received|took in] {a} {item}, [then|later] {b}, [then|and finally] {c}, [but|yet] "
        "{d} [disappeared|were stolen|went bad]. [How many {item} are still there|What is the count now]?",
        "[{r} {item} are still there.|The count is now {r}.]",
    ),
    # ({a}+{b})/{c}
    (
        7,
        "[Nina|Omar|The class] [has|collected] {a} {item} and [got|found] {b} more, then [shared|split|divided] "
        "[all of them|the lot] [equally|evenly] [among|between|into] {c} [people|bags|rows]. How many [each|per one]?",
        "[Each gets {r} {item}.|{r} {item} per one.]",
    ),
    (
        7,
        "[Share|Split] {a} [big|old] and {b} [small|new] {item} [equally|evenly] [among|across] {c} [kids|boxes]. "
        "[How many does each get|What does each get]?",
        "[Each gets {r} {item}.|Each one gets {r}.]",
    ),
    (
        7,
        "[Among|Between] {c} [teams|shelves], {a} {item} [plus|together with] {b} [others|extra] are [split|spread] "
        "[equally|evenly]. How many {item} [per team|does each get]?",
        "[Each gets {r} {item}.|{r} {item} each.]",
    ),
    (
        7,
        "[If|When] {a} {item} and {b} [more|other] {item} are [packed|divided] [evenly|equally] into {c} [crates|groups], "
        "how many [go in each|are in each]?",
        "[{r} {item} go in each.|Each has {r} {item}.]",
    ),
    (
        7,
        "[Kim|A baker|The depot] [mixed|merged|joined] {a} {item} [and|together with] {b} [others|extra ones], then "
        "[gave|handed] [equal shares|the same amount] to {c} [guests|classes|stores]. How many {item} did each [receive|get]?",
        "[Each received {r} {item}.|Each one got {r}.]",
    ),
    # second round: other verbs, clause orders and sentence shapes for every tree
    (
        0,
        "[The tank|A barrel|The cellar] [contained|stored] {a} {item}. {b} [leaked out|were drawn off|got used], "
        "[after which|and afterwards] {c} [were poured in|were topped up|came back]. [What does it contain now|How many {item} now]?",
        "[It now contains {r} {item}.|Now it has {r} {item}.]",
    ),
    (
        0,
        "[Begin|Open] with {a} {item}; [deduct|drop] {b}; [then|and then] [gain|add on] {c}. [What is the result|Final amount]?",
        "[The result is {r}.|The final amount is {r} {item}.]",
    ),
    (
        1,
        "[Each|Every] [row|line] of a [garden|field] [grows|has] {b} {item} and there are {a} [rows|lines]; "
        "[a further|an extra] {c} {item} [grow|sit] [by the gate|near the fence]. How many {item} [altogether|does it have]?",
        "[Altogether it has {r} {item}.|It has {r} {item}.]",
    ),
    (
        1,
        "{c} {item} [plus|and also] {a} [sets|packets] of {b} [make|give] how many {item}?",
        "[They make {r} {item}.|That gives {r} {item}.]",
    ),
    (
        2,
        "[Workers|A crew] [loaded|placed] {b} {item} onto each of {a} [carts|pallets] and [later|afterwards] "
        "[unloaded|dropped|misplaced] {c}. How many {item} [are still loaded|stay on board]?",
        "[{r} {item} are still loaded.|{r} {item} stay on board.]",
    ),
    (
        2,
        "[Subtract|Deduct] {c} from {a} [times|lots of] {b} {item}. [What is the answer|What do you get]?",
        "[The answer is {r}.|You get {r} {item}.]",
    ),
    (
        3,
        "[A seller|Dan] [has|offers] {a} [large|blue] and {b} [small|green] {item}, [each priced at|each one at] {c} "
        "[cents|coins]. [What is their value|How much are they all worth]?",
        "[Their value is {r} cents.|They are all worth {r} coins.]",
    ),
    (
        3,
        "{c} [cents|coins] [buys|pays for] one {item}. What [does it cost|is the price] to buy {a} [today|now] and {b} "
        "[tomorrow|later]?",
        "[It costs {r} coins.|The price is {r} cents.]",
    ),
    (
        4,
        "[Out of|Of] {a} {item}, {b} [were kept back|stay in storage], and the [others|rest] [go|are sent] to {c} "
        "[schools|shops] in equal [amounts|numbers]. How many {item} does [each school|one shop] [get|receive]?",
        "[Each school gets {r} {item}.|One shop receives {r} {item}.]",
    ),
    (
        4,
        "[Set aside|Hold back] {b} of {a} {item} and [give|hand] [the others|what stays] [equally|evenly] to {c} "
        "[pupils|visitors]. [How many each|What does one get]?",
        "[{r} {item} each.|One gets {r} {item}.]",
    ),
    (
        5,
        "[In|Inside] {a} [cartons|boxes] [are|sit] {b} [packs|tins] each, [and|while] every [pack|tin] [has|holds] {c} "
        "{item}. [Find the number of {item}|How many {item} is that in total]?",
        "[The number is {r}.|In total that is {r} {item}.]",
    ),
    (
        5,
        "{a} [times|lots of] {b} [groups|sets] of {c} {item}: how many {item}?",
        "[{r} {item}.|There are {r} {item}.]",
    ),
    (
        6,
        "[Add up|Total] {a}, {b} and {c} {item}, [then|and] [take off|deduct] {d}. [What is the result|What do you get]?",
        "[The result is {r}.|You get {r} {item}.]",
    ),
    (
        6,
        "[After|Once] {d} [were sold|were given out], how many {item} [were left|remained] of the {a}, {b} and {c} "
        "[bought|made] [earlier|before]?",
        "[{r} {item} were left.|{r} remained.]",
    ),
    (
        7,
        "{c} [kids|players] [divide|share out] [equally|fairly] the {a} {item} [from one box|of one box] and the {b} "
        "[from another|of another]. [How many does each get|How many per kid]?",
        "[Each gets {r} {item}.|{r} per kid.]",
    ),
    (
        7,
        "[Put|Place] {a} {item} [with|beside] {b} others [and|then] [split|divide] [them|the total] into {c} "
        "[equal parts|equal heaps]. How large is each [part|heap]?",
        "[Each part is {r} {item}.|Each heap has {r} {item}.]",
    ),
)


def expand(text: str) -> list[str]:
    """Every combination of the ``[x|y]`` alternatives in ``text`` (single spaces kept)."""
    parts = _ALTERNATIVES.split(text)  # literal, choices, literal, choices, ...
    choices = [[c] if i % 2 == 0 else c.split("|") for i, c in enumerate(parts)]
    return [
        re.sub(r" {2,}", " ", "".join(combo)).replace(" ,", ",")
        for combo in itertools.product(*choices)
    ]


def frame_templates(index: int, count: int, rng: random.Random) -> list[Template]:
    """``count`` (at most all) phrasings expanded from ``FRAMES[index]``, drawn with ``rng``."""
    pattern, question, answer = FRAMES[index]
    questions, answers = expand(question), expand(answer)
    chosen = rng.sample(questions, min(len(questions), count))
    return [Template(PATTERNS[pattern], q, answers[i % len(answers)]) for i, q in enumerate(chosen)]


def generated_templates(per_frame: int = 8, seed: int = 0) -> tuple[Template, ...]:
    """Up to ``per_frame`` expanded phrasings of every frame, drawn with a fixed seed."""
    rng = random.Random(seed)
    order = sorted(range(len(FRAMES)), key=lambda i: FRAMES[i][0])  # pattern by pattern
    return tuple(t for i in order for t in frame_templates(i, per_frame, rng))
