"""A small, deterministic, bilingual (English + Chinese) training corpus built into the package.

`cpm2 init` trains a SentencePiece vocabulary from it so that a randomly initialised model ships
with a real tokenizer without downloading anything. The text is written here by hand (no third
party corpus, no licence questions) and expanded with number spellings and arithmetic so that the
vocabulary learns digits, English number words and Chinese numerals side by side, e.g.
``4096 = four thousand ninety-six = 四千零九十六``.
"""

import random
from collections.abc import Iterator

from engine.errors import InputError

# Word pairs are the backbone of the corpus: each appears in glossary lines and template sentences.
# One line per topic (people, nature, animals, food, places and things, time, abstract, adjectives,
# verbs), written as english=中文 so the table stays compact.
_GLOSSARY_TEXT = """
person=人 man=男人 woman=女人 child=孩子 friend=朋友
teacher=老师 student=学生 doctor=医生 mother=母亲 father=父亲
brother=兄弟 sister=姐妹 family=家庭 worker=工人 farmer=农民
engineer=工程师 scientist=科学家 writer=作家 king=国王 neighbor=邻居
water=水 fire=火 mountain=山 river=河 sea=海
sky=天空 sun=太阳 moon=月亮 star=星星 rain=雨
snow=雪 wind=风 cloud=云 tree=树 flower=花
grass=草 forest=森林 stone=石头 earth=地球 island=岛
dog=狗 cat=猫 bird=鸟 fish=鱼 horse=马
cow=牛 sheep=羊 pig=猪 chicken=鸡 tiger=老虎
panda=熊猫 rabbit=兔子 dragon=龙 monkey=猴子 elephant=大象
rice=米饭 bread=面包 noodles=面条 tea=茶 milk=牛奶
apple=苹果 orange=橙子 egg=鸡蛋 meat=肉 vegetable=蔬菜
soup=汤 sugar=糖 salt=盐 coffee=咖啡 dumpling=饺子
house=房子 home=家 school=学校 city=城市 village=村子
country=国家 road=路 bridge=桥 market=市场 hospital=医院
library=图书馆 station=车站 park=公园 office=办公室 kitchen=厨房
book=书 pen=笔 paper=纸 table=桌子 chair=椅子
door=门 window=窗户 car=汽车 train=火车 ship=船
plane=飞机 phone=电话 computer=电脑 clock=钟 money=钱
letter=信 picture=图片 song=歌 game=游戏 gift=礼物
day=天 night=夜晚 morning=早上 evening=晚上 week=星期
month=月 year=年 hour=小时 minute=分钟 second=秒
today=今天 tomorrow=明天 yesterday=昨天 spring=春天 summer=夏天
autumn=秋天 winter=冬天 time=时间 history=历史 future=未来
language=语言 word=词 sentence=句子 question=问题 answer=答案
number=数字 sum=和 model=模型 data=数据 memory=内存
network=网络 program=程序 problem=难题 idea=想法 story=故事
knowledge=知识 science=科学 music=音乐 art=艺术 health=健康
big=大 small=小 long=长 short=短 new=新
old=旧 good=好 bad=坏 hot=热 cold=冷
fast=快 slow=慢 happy=高兴 sad=难过 beautiful=美丽
important=重要 simple=简单 difficult=困难 red=红色 blue=蓝色
green=绿色 white=白色 black=黑色 yellow=黄色 quiet=安静
eat=吃 drink=喝 read=读 write=写 see=看见
hear=听见 speak=说 walk=走 run=跑 sleep=睡觉
learn=学习 teach=教 buy=买 sell=卖 open=打开
close=关上 give=给 take=拿 make=做 think=想
love=爱 like=喜欢 help=帮助 find=找到 count=数
"""
_GLOSSARY: tuple[tuple[str, str], ...] = tuple(
    (english, chinese) for english, _, chinese in (pair.partition("=") for pair in _GLOSSARY_TEXT.split())
)

_ENGLISH_SENTENCES: tuple[str, ...] = (
    "Hello, world!",
    "How are you today?",
    "I am fine, thank you.",
    "The weather is nice this morning.",
    "It is raining outside, so take an umbrella.",
    "My name is Li Ming and I live in Beijing.",
    "She reads a book every evening before she sleeps.",
    "We learn a new language one word at a time.",
    "The train leaves the station at seven o'clock.",
    "Can you help me find the library?",
    "Two plus two is four, and four plus four is eight.",
    "A model turns a question into an answer.",
    "Numbers can be written with digits or with words.",
    "The quick brown fox jumps over the lazy dog.",
    "Please close the door when you leave the room.",
    "He drinks tea in the morning and coffee in the afternoon.",
    "The children are playing in the park.",
    "Spring comes after winter, and summer comes after spring.",
    "Knowledge is power.",
    "Practice makes perfect.",
    "Where there is a will, there is a way.",
    "A journey of a thousand miles begins with a single step.",
    "Don't put off until tomorrow what you can do today.",
    "The sum of two even numbers is always even.",
    "Every computer needs memory to run a program.",
    "What time is it? It's half past three.",
    "I'd like a bowl of noodles and a cup of green tea, please.",
    "The river flows from the mountains to the sea.",
    "Thank you very much for your gift!",
    "Good night, and see you tomorrow.",
    "Mixture-of-experts models route each token to a few experts.",
    "The encoder reads the input; the decoder writes the output.",
    "Is this answer correct? Let's check it again.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "January, February, March, April, May, June, July, August, September, October, November, December.",
)

# Every printable ASCII character appears here, so none of them needs byte fallback.
_SYMBOL_LINES: tuple[str, ...] = (
    "def add(a, b):  # returns the sum",
    "    return a + b",
    "x = {\"key\": [1, 2, 3], 'other': (4, 5)}",
    'if (a <= b && c >= d) || !e { print(f"{a}"); }',
    "path/to/some_file.txt and C:\\Users\\me\\notes.md",
    "Email me at someone@example.com or visit https://example.com/?q=1&lang=en#top",
    "Prices: $5, 20% off, 3 * 4 = 12, 2^10 = 1024, 7 / 2 = 3.5, 9 - 3 = 6, ~100 items.",
    "Use `code` for inline code; use | for pipes; use <tags> for markup.",
    'Tom\'s dog said "woof!" -- really? Yes: really.',
    "The list [a, b, c] has 3 items; the set {x, y} has 2.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "<extra_id_0> and <extra_id_1> mark the masked spans of a sentence.",
)

_CHINESE_SENTENCES: tuple[str, ...] = (
    "你好，世界！",
    "你今天好吗？",
    "我很好，谢谢你。",
    "今天早上天气很好。",
    "外面在下雨，请带上雨伞。",
    "我叫李明，我住在北京。",
    "她每天晚上睡觉前都看书。",
    "我们一个词一个词地学习新的语言。",
    "火车七点钟从车站出发。",
    "你能帮我找到图书馆吗？",
    "二加二等于四，四加四等于八。",
    "模型把问题变成答案。",
    "数字可以用阿拉伯数字写，也可以用汉字写。",
    "离开房间的时候请关上门。",
    "他早上喝茶，下午喝咖啡。",
    "孩子们在公园里玩。",
    "冬天过去了，春天就来了。",
    "知识就是力量。",
    "熟能生巧。",
    "有志者事竟成。",
    "千里之行，始于足下。",
    "今日事，今日毕。",
    "两个偶数的和总是偶数。",
    "每台电脑都需要内存来运行程序。",
    "现在几点了？三点半。",
    "请给我一碗面条和一杯绿茶。",
    "河水从山上流到大海。",
    "非常感谢你的礼物！",
    "晚安，明天见。",
    "混合专家模型把每个词元交给少数几个专家。",
    "编码器读入输入，解码器写出输出。",
    "这个答案对吗？我们再检查一遍。",
    "一、二、三、四、五、六、七、八、九、十。",
    "星期一、星期二、星期三、星期四、星期五、星期六和星期日。",
    "中国有很多美丽的山和河。",
    "学而时习之，不亦说乎？",
)

_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("I", "我"),
    ("You", "你"),
    ("He", "他"),
    ("She", "她"),
    ("We", "我们"),
    ("They", "他们"),
    ("My friend", "我的朋友"),
    ("The teacher", "老师"),
    ("The student", "学生"),
    ("Our family", "我们家"),
)

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ZH_DIGITS = "零一二三四五六七八九"
_MAX_NUMBER = 10**8 - 1  # both spellers stop below 亿 (10^8), far beyond what the corpus uses


def _check_range(n: int) -> None:
    if not 0 <= n <= _MAX_NUMBER:
        raise InputError(f"can only spell integers in [0, {_MAX_NUMBER}], got {n}")


def _english_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest:
        tens, ones = divmod(rest, 10)
        words.append(_ONES[rest] if rest < 20 else _TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    return " ".join(words)


def english_number(n: int) -> str:
    """Spell ``0 <= n < 10**8`` in American English words without "and": 4096 -> four thousand ninety-six."""
    _check_range(n)
    if n == 0:
        return "zero"
    parts = []
    for scale_value, scale in ((10**6, " million"), (10**3, " thousand"), (1, "")):
        chunk = n // scale_value % 1000
        if chunk:
            parts.append(_english_below_1000(chunk) + scale)
    return " ".join(parts)


def _chinese_below_10000(n: int) -> str:
    out: list[str] = []
    is_zero_pending = False
    for unit_value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // unit_value % 10
        if digit == 0:
            # Interior zeros collapse into one 零, trailing zeros are silent: 4096 -> 四千零九十六.
            is_zero_pending = bool(out)
            continue
        if is_zero_pending:
            out.append("零")
            is_zero_pending = False
        out.append(_ZH_DIGITS[digit] + unit)
    return "".join(out)


def chinese_number(n: int) -> str:
    """Spell ``0 <= n < 10**8`` in Chinese numerals: 4096 -> 四千零九十六, 10010 -> 一万零一十."""
    _check_range(n)
    if n == 0:
        return "零"
    high, low = divmod(n, 10_000)
    text = _chinese_below_10000(high) + "万" if high else ""
    if low:
        # A gap of at least one zero digit between 万 and the rest is spoken as 零: 一万零五.
        text += ("零" if high and low < 1000 else "") + _chinese_below_10000(low)
    # 10-19 (and 10万-19万) drop the leading 一: 十五, 十五万, but 一百一十 keeps it.
    return text[1:] if text.startswith("一十") else text


def _number_lines(rng: random.Random) -> Iterator[str]:
    numbers = list(range(1001)) + [2**k for k in range(10, 27)]
    numbers += [rng.randrange(1000, 10**4) for _ in range(600)]
    numbers += [rng.randrange(10**4, 10**7) for _ in range(600)]
    for n in numbers:
        yield f"{n} = {english_number(n)} = {chinese_number(n)}"


def _sum_lines(rng: random.Random) -> Iterator[str]:
    for _ in range(1500):
        a, b = rng.randrange(1000), rng.randrange(1000)
        yield f"{a} + {b} = {a + b}"
        yield f"{english_number(a).capitalize()} plus {english_number(b)} is {english_number(a + b)}."
        yield f"{chinese_number(a)}加{chinese_number(b)}等于{chinese_number(a + b)}。"


def _word_lines(rng: random.Random) -> Iterator[str]:
    for english, chinese in _GLOSSARY:
        yield f"{english} = {chinese}"
        yield f'The Chinese word for "{english}" is "{chinese}".'
        yield f"“{chinese}”的英文是“{english}”。"
    for _ in range(2000):
        (subject_en, subject_zh), (noun_en, noun_zh) = rng.choice(_SUBJECTS), rng.choice(_GLOSSARY)
        count = rng.randrange(2, 100)
        yield f'{subject_en} wrote the word "{noun_en}" {count} times.'
        yield f"{subject_zh}把“{noun_zh}”写了{chinese_number(count)}遍。"
    for _ in range(4):
        yield from _ENGLISH_SENTENCES
        yield from _CHINESE_SENTENCES
        yield from _SYMBOL_LINES


def builtin_corpus(*, seed: int = 0) -> Iterator[str]:
    """Yield the built-in bilingual corpus, one line per item, identical for the same ``seed``.

    About 11,600 lines (~570 kB): enough for a ~1000-piece unigram vocabulary in a few seconds.
    """
    rng = random.Random(seed)
    yield from _number_lines(rng)
    yield from _sum_lines(rng)
    yield from _word_lines(rng)
