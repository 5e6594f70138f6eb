#!/usr/bin/env python3
"""Generate the `make demo` data sets under data/demo/ (deterministic, committed).

    python scripts/make_demo_data.py            # (re)write data/demo/*.jsonl
    python scripts/make_demo_data.py --check    # exit 1 unless the committed files equal a fresh generation
    python scripts/make_demo_data.py --out DIR  # write somewhere else

Outputs (JSON Lines, UTF-8, one record per line):
  pretrain_train.jsonl / pretrain_eval.jsonl   {"text": ...}: a small multilingual corpus built from templates
      (weather reports, shop orders, calendars, unit conversions, arithmetic, exchange rates, departures,
      phrase books and plain-text "tool logs") in 11 languages; each document 30-150 Tekken tokens.
  tools_train.jsonl / tools_eval.jsonl         {"messages": [...], "tools": [...]}: OpenAI / mistral-finetune
      style function-calling conversations (single and parallel calls, plain chat, system prompts, multi-turn)
      in the same 11 languages; every one encodes with mistral-common's V3 Tekken instruct tokenizer in
      finetuning mode and is at most 256 tokens long.
  prefs_train.jsonl / prefs_eval.jsonl         {"messages": [...], "tools": [...], "chosen": {...}, "rejected": {...}}:
      preference pairs for the demo's DPO stage (nemo_jax/preference.py), one per tool-calling conversation of
      tools_train / tools_eval: the prompt is the conversation up to its first tool-calling turn, `chosen` that
      turn (the right tool with the right arguments), `rejected` the same turn with another tool's name or one
      argument value changed.

Train and eval are drawn from different seeds; eval records that happen to equal a train record are dropped.
Everything depends only on the seeds below, `random.Random` and the tokenizer packaged with mistral-common, so
the output is byte-identical from run to run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "data" / "demo"

SEEDS = {"pretrain_train": 1001, "pretrain_eval": 2002, "tools_train": 3003, "tools_eval": 4004,
         "prefs_train": 5005, "prefs_eval": 6006}
COUNTS = {"pretrain_train": 3000, "pretrain_eval": 200, "tools_train": 1500, "tools_eval": 150}
FILES = [f"{name}.jsonl" for name in SEEDS]

MAX_TOKENS = 256  # the demo's train.seq_len
PREF_TRAIN_PAIRS = 500  # the DPO stage's training pairs (it takes a few of them; data/demo stays under 3 MB)
DISTRACTOR_MAX_TOKENS = 224  # an unused extra tool is offered only where the conversation stays this short
DOC_MIN_TOKENS, DOC_MAX_TOKENS = 30, 150  # pretraining documents, BOS + text + EOS

LANGS = ["en", "fr", "de", "es", "it", "pt", "zh", "ja", "ru", "ar", "hi"]

# --------------------------------------------------------------------------------------------------------------
# Vocabulary tables (columns in LANGS order)
# --------------------------------------------------------------------------------------------------------------


def _table(rows):
    return [dict(zip(LANGS, row, strict=True)) for row in rows]


CITIES = _table([
    ("Paris", "Paris", "Paris", "París", "Parigi", "Paris", "巴黎", "パリ", "Париж", "باريس", "पेरिस"),
    ("London", "Londres", "London", "Londres", "Londra", "Londres", "伦敦", "ロンドン", "Лондон", "لندن", "लंदन"),
    ("Berlin", "Berlin", "Berlin", "Berlín", "Berlino", "Berlim", "柏林", "ベルリン", "Берлин", "برلين", "बर्लिन"),
    ("Madrid", "Madrid", "Madrid", "Madrid", "Madrid", "Madrid", "马德里", "マドリード", "Мадрид", "مدريد", "मैड्रिड"),
    ("Rome", "Rome", "Rom", "Roma", "Roma", "Roma", "罗马", "ローマ", "Рим", "روما", "रोम"),
    ("Lisbon", "Lisbonne", "Lissabon", "Lisboa", "Lisbona", "Lisboa", "里斯本", "リスボン", "Лиссабон", "لشبونة",
     "लिस्बन"),
    ("Tokyo", "Tokyo", "Tokio", "Tokio", "Tokyo", "Tóquio", "东京", "東京", "Токио", "طوكيو", "टोक्यो"),
    ("Beijing", "Pékin", "Peking", "Pekín", "Pechino", "Pequim", "北京", "北京", "Пекин", "بكين", "बीजिंग"),
    ("Moscow", "Moscou", "Moskau", "Moscú", "Mosca", "Moscou", "莫斯科", "モスクワ", "Москва", "موسكو", "मॉस्को"),
    ("Dubai", "Dubaï", "Dubai", "Dubái", "Dubai", "Dubai", "迪拜", "ドバイ", "Дубай", "دبي", "दुबई"),
    ("Delhi", "Delhi", "Delhi", "Delhi", "Delhi", "Déli", "德里", "デリー", "Дели", "دلهي", "दिल्ली"),
    ("New York", "New York", "New York", "Nueva York", "New York", "Nova Iorque", "纽约", "ニューヨーク",
     "Нью-Йорк", "نيويورك", "न्यूयॉर्क"),
    ("Sydney", "Sydney", "Sydney", "Sídney", "Sydney", "Sydney", "悉尼", "シドニー", "Сидней", "سيدني", "सिडनी"),
    ("Toronto", "Toronto", "Toronto", "Toronto", "Toronto", "Toronto", "多伦多", "トロント", "Торонто",
     "تورونتو", "टोरंटो"),
    ("Mumbai", "Mumbai", "Mumbai", "Bombay", "Mumbai", "Mumbai", "孟买", "ムンバイ", "Мумбаи", "مومباي", "मुंबई"),
    ("Istanbul", "Istanbul", "Istanbul", "Estambul", "Istanbul", "Istambul", "伊斯坦布尔", "イスタンブール",
     "Стамбул", "إسطنبول", "इस्तांबुल"),
    ("Lyon", "Lyon", "Lyon", "Lyon", "Lione", "Lyon", "里昂", "リヨン", "Лион", "ليون", "ल्योन"),
    ("Barcelona", "Barcelone", "Barcelona", "Barcelona", "Barcellona", "Barcelona", "巴塞罗那", "バルセロナ",
     "Барселона", "برشلونة", "बार्सिलोना"),
    ("Seoul", "Séoul", "Seoul", "Seúl", "Seul", "Seul", "首尔", "ソウル", "Сеул", "سول", "सियोल"),
    ("Vienna", "Vienne", "Wien", "Viena", "Vienna", "Viena", "维也纳", "ウィーン", "Вена", "فيينا", "वियना"),
])

CONDITIONS = ["sunny", "cloudy", "rainy", "snowy", "windy", "foggy"]
COND_NAMES = dict(zip(CONDITIONS, _table([
    ("sunny", "ensoleillé", "sonnig", "soleado", "soleggiato", "ensolarado", "晴朗", "晴れ", "солнечно", "مشمس",
     "धूप"),
    ("cloudy", "nuageux", "bewölkt", "nublado", "nuvoloso", "nublado", "多云", "曇り", "облачно", "غائم", "बादल"),
    ("rainy", "pluvieux", "regnerisch", "lluvioso", "piovoso", "chuvoso", "有雨", "雨", "дождливо", "ممطر", "बारिश"),
    ("snowy", "neigeux", "verschneit", "nevado", "nevoso", "com neve", "下雪", "雪", "снежно", "مثلج", "बर्फ़बारी"),
    ("windy", "venteux", "windig", "ventoso", "ventoso", "ventoso", "有风", "風が強い", "ветрено", "عاصف", "तेज़ हवा"),
    ("foggy", "brumeux", "neblig", "con niebla", "nebbioso", "com neblina", "有雾", "霧", "туманно", "ضبابي",
     "कोहरा"),
])))

CURRENCIES = ["EUR", "USD", "GBP", "JPY", "CNY", "INR", "CHF"]
USD_PER = {"EUR": 1.08, "USD": 1.0, "GBP": 1.27, "JPY": 0.0067, "CNY": 0.138, "INR": 0.012, "CHF": 1.13}
CUR_NAMES = dict(zip(CURRENCIES, _table([
    ("euros", "euros", "Euro", "euros", "euro", "euros", "欧元", "ユーロ", "EUR", "يورو", "यूरो"),
    ("US dollars", "dollars américains", "US-Dollar", "dólares estadounidenses", "dollari statunitensi",
     "dólares americanos", "美元", "米ドル", "USD", "دولار أمريكي", "अमेरिकी डॉलर"),
    ("British pounds", "livres sterling", "britische Pfund", "libras esterlinas", "sterline britanniche",
     "libras esterlinas", "英镑", "英ポンド", "GBP", "جنيه إسترليني", "ब्रिटिश पाउंड"),
    ("Japanese yen", "yens japonais", "japanische Yen", "yenes japoneses", "yen giapponesi", "ienes japoneses",
     "日元", "日本円", "JPY", "ين ياباني", "जापानी येन"),
    ("Chinese yuan", "yuans chinois", "chinesische Yuan", "yuanes chinos", "yuan cinesi", "yuans chineses",
     "人民币", "人民元", "CNY", "يوان صيني", "चीनी युआन"),
    ("Indian rupees", "roupies indiennes", "indische Rupien", "rupias indias", "rupie indiane", "rúpias indianas",
     "印度卢比", "インドルピー", "INR", "روبية هندية", "भारतीय रुपये"),
    ("Swiss francs", "francs suisses", "Schweizer Franken", "francos suizos", "franchi svizzeri",
     "francos suíços", "瑞士法郎", "スイスフラン", "CHF", "فرنك سويسري", "स्विस फ़्रैंक"),
])))

LANG_NAMES = dict(zip(LANGS, _table([  # row: the language named; columns: the language it is named in
    ("English", "anglais", "Englisch", "inglés", "inglese", "inglês", "英语", "英語", "английский",
     "الإنجليزية", "अंग्रेज़ी"),
    ("French", "français", "Französisch", "francés", "francese", "francês", "法语", "フランス語", "французский",
     "الفرنسية", "फ़्रेंच"),
    ("German", "allemand", "Deutsch", "alemán", "tedesco", "alemão", "德语", "ドイツ語", "немецкий", "الألمانية",
     "जर्मन"),
    ("Spanish", "espagnol", "Spanisch", "español", "spagnolo", "espanhol", "西班牙语", "スペイン語", "испанский",
     "الإسبانية", "स्पेनिश"),
    ("Italian", "italien", "Italienisch", "italiano", "italiano", "italiano", "意大利语", "イタリア語", "итальянский",
     "الإيطالية", "इतालवी"),
    ("Portuguese", "portugais", "Portugiesisch", "portugués", "portoghese", "português", "葡萄牙语", "ポルトガル語",
     "португальский", "البرتغالية", "पुर्तगाली"),
    ("Chinese", "chinois", "Chinesisch", "chino", "cinese", "chinês", "中文", "中国語", "китайский", "الصينية",
     "चीनी"),
    ("Japanese", "japonais", "Japanisch", "japonés", "giapponese", "japonês", "日语", "日本語", "японский",
     "اليابانية", "जापानी"),
    ("Russian", "russe", "Russisch", "ruso", "russo", "russo", "俄语", "ロシア語", "русский", "الروسية", "रूसी"),
    ("Arabic", "arabe", "Arabisch", "árabe", "arabo", "árabe", "阿拉伯语", "アラビア語", "арабский", "العربية",
     "अरबी"),
    ("Hindi", "hindi", "Hindi", "hindi", "hindi", "hindi", "印地语", "ヒンディー語", "хинди", "الهندية", "हिंदी"),
])))

PHRASES = _table([
    ("Good morning", "Bonjour", "Guten Morgen", "Buenos días", "Buongiorno", "Bom dia", "早上好", "おはようございます",
     "Доброе утро", "صباح الخير", "सुप्रभात"),
    ("Thank you very much", "Merci beaucoup", "Vielen Dank", "Muchas gracias", "Grazie mille", "Muito obrigado",
     "非常感谢", "どうもありがとうございます", "Большое спасибо", "شكرًا جزيلًا", "बहुत धन्यवाद"),
    ("Where is the train station?", "Où est la gare ?", "Wo ist der Bahnhof?", "¿Dónde está la estación de tren?",
     "Dov'è la stazione?", "Onde fica a estação de trem?", "火车站在哪里？", "駅はどこですか？", "Где вокзал?",
     "أين محطة القطار؟", "रेलवे स्टेशन कहाँ है?"),
    ("How much does it cost?", "Combien ça coûte ?", "Wie viel kostet das?", "¿Cuánto cuesta?", "Quanto costa?",
     "Quanto custa?", "这个多少钱？", "いくらですか？", "Сколько это стоит?", "كم سعره؟", "इसकी कीमत कितनी है?"),
    ("See you tomorrow", "À demain", "Bis morgen", "Hasta mañana", "A domani", "Até amanhã", "明天见", "また明日",
     "До завтра", "أراك غدًا", "कल मिलते हैं"),
    ("The weather is nice today", "Il fait beau aujourd'hui", "Heute ist schönes Wetter", "Hoy hace buen tiempo",
     "Oggi fa bel tempo", "Hoje o tempo está bom", "今天天气很好", "今日はいい天気です", "Сегодня хорошая погода",
     "الطقس جميل اليوم", "आज मौसम अच्छा है"),
    ("I would like a coffee", "Je voudrais un café", "Ich hätte gern einen Kaffee", "Quisiera un café",
     "Vorrei un caffè", "Eu gostaria de um café", "我想要一杯咖啡", "コーヒーをください", "Я хотел бы кофе",
     "أريد فنجان قهوة", "मुझे एक कॉफ़ी चाहिए"),
    ("Happy birthday", "Joyeux anniversaire", "Alles Gute zum Geburtstag", "Feliz cumpleaños", "Buon compleanno",
     "Feliz aniversário", "生日快乐", "お誕生日おめでとうございます", "С днём рождения", "عيد ميلاد سعيد",
     "जन्मदिन मुबारक हो"),
    ("The museum is closed on Monday", "Le musée est fermé le lundi", "Das Museum ist montags geschlossen",
     "El museo cierra los lunes", "Il museo è chiuso il lunedì", "O museu fecha às segundas-feiras",
     "博物馆周一闭馆", "博物館は月曜日休館です", "Музей закрыт по понедельникам", "المتحف مغلق يوم الاثنين",
     "संग्रहालय सोमवार को बंद रहता है"),
])

NAMES = {
    "en": ["Emma", "James", "Olivia", "Noah", "Sophia", "Liam"],
    "fr": ["Camille", "Louis", "Chloé", "Hugo", "Léa", "Jules"],
    "de": ["Anna", "Lukas", "Mia", "Felix", "Lena", "Jonas"],
    "es": ["Lucía", "Mateo", "Sofía", "Diego", "Valeria", "Pablo"],
    "it": ["Giulia", "Marco", "Chiara", "Luca", "Sara", "Matteo"],
    "pt": ["Ana", "João", "Beatriz", "Pedro", "Mariana", "Tiago"],
    "zh": ["王伟", "李娜", "张敏", "刘洋", "陈静", "杨帆"],
    "ja": ["佐藤", "鈴木", "高橋", "田中", "伊藤", "山本"],
    "ru": ["Анна", "Иван", "Мария", "Дмитрий", "Ольга", "Сергей"],
    "ar": ["أحمد", "فاطمة", "محمد", "مريم", "علي", "ليلى"],
    "hi": ["राहुल", "प्रिया", "अमित", "अनीता", "विकास", "सुनीता"],
}

ITEM_PRICES = [1.2, 2.5, 4.8, 1.1, 3.9, 2.2, 3.5, 2.9]  # EUR per unit
ITEMS = {
    "en": ["apples", "bread", "coffee", "milk", "cheese", "rice", "tea", "eggs"],
    "fr": ["pommes", "pain", "café", "lait", "fromage", "riz", "thé", "œufs"],
    "de": ["Äpfel", "Brot", "Kaffee", "Milch", "Käse", "Reis", "Tee", "Eier"],
    "es": ["manzanas", "pan", "café", "leche", "queso", "arroz", "té", "huevos"],
    "it": ["mele", "pane", "caffè", "latte", "formaggio", "riso", "tè", "uova"],
    "pt": ["maçãs", "pão", "café", "leite", "queijo", "arroz", "chá", "ovos"],
    "zh": ["苹果", "面包", "咖啡", "牛奶", "奶酪", "大米", "茶叶", "鸡蛋"],
    "ja": ["りんご", "パン", "コーヒー", "牛乳", "チーズ", "米", "お茶", "卵"],
    "ru": ["яблоки", "хлеб", "кофе", "молоко", "сыр", "рис", "чай", "яйца"],
    "ar": ["تفاح", "خبز", "قهوة", "حليب", "جبن", "أرز", "شاي", "بيض"],
    "hi": ["सेब", "ब्रेड", "कॉफ़ी", "दूध", "पनीर", "चावल", "चाय", "अंडे"],
}

EVENT_TITLES = {
    "en": ["Team meeting", "Dentist appointment", "Yoga class", "Project review", "Birthday party",
           "Call with the bank"],
    "fr": ["Réunion d'équipe", "Rendez-vous chez le dentiste", "Cours de yoga", "Revue de projet",
           "Fête d'anniversaire", "Appel avec la banque"],
    "de": ["Teammeeting", "Zahnarzttermin", "Yogakurs", "Projektbesprechung", "Geburtstagsfeier",
           "Anruf bei der Bank"],
    "es": ["Reunión de equipo", "Cita con el dentista", "Clase de yoga", "Revisión del proyecto",
           "Fiesta de cumpleaños", "Llamada con el banco"],
    "it": ["Riunione di team", "Appuntamento dal dentista", "Lezione di yoga", "Revisione del progetto",
           "Festa di compleanno", "Chiamata con la banca"],
    "pt": ["Reunião de equipe", "Consulta no dentista", "Aula de ioga", "Revisão do projeto",
           "Festa de aniversário", "Ligação com o banco"],
    "zh": ["团队会议", "看牙医", "瑜伽课", "项目评审", "生日聚会", "给银行打电话"],
    "ja": ["チームミーティング", "歯医者の予約", "ヨガ教室", "プロジェクトレビュー", "誕生日パーティー", "銀行との電話"],
    "ru": ["Встреча команды", "Приём у стоматолога", "Занятие йогой", "Обзор проекта", "День рождения",
           "Звонок в банк"],
    "ar": ["اجتماع الفريق", "موعد طبيب الأسنان", "درس يوغا", "مراجعة المشروع", "حفلة عيد ميلاد", "مكالمة مع البنك"],
    "hi": ["टीम मीटिंग", "दंत चिकित्सक से मुलाकात", "योग कक्षा", "प्रोजेक्ट समीक्षा", "जन्मदिन की पार्टी",
           "बैंक से कॉल"],
}

AIRLINES = ["AF", "LH", "IB", "AZ", "TP", "BA", "JL", "CA", "SU", "EK", "AI", "TK"]

# --------------------------------------------------------------------------------------------------------------
# Sentence templates per language
# --------------------------------------------------------------------------------------------------------------

T = {
    "en": {
        "w_req": ["What's the weather like in {city}?", "How is the weather in {city} today?",
                  "Can you check the weather in {city}?"],
        "w_req_unit": ["What's the weather in {city} in {unit}?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["What's the weather in {city1} and {city2}?"],
        "w2_ans": "In {city1} it is {temp1} {deg} and {cond1}; in {city2}, {temp2} {deg} and {cond2}.",
        "w_ans": "In {city} it is {temp} {deg} and {cond}.",
        "w_follow": "And in {city}?",
        "c_req": ["Convert {amount} {from} to {to}.", "How much is {amount} {from} in {to}?"],
        "c_ans": "{amount} {from} is {result} {to}.",
        "e_req": ['Add "{title}" to my calendar on {date} at {time}.', 'Schedule "{title}" for {date} at {time}.'],
        "e_ans": "Done! \"{title}\" has been added to your calendar.",
        "f_req": ["Find flights from {origin} to {dest} on {date}.",
                  "Are there flights from {origin} to {dest} on {date}?"],
        "f_ans": "Flights from {origin} to {dest}: {list}.",
        "f_item": "{flight} at {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "Sorry, there are no flights from {origin} to {dest} on that day.",
        "k_req": ["What is {expr}?", "Calculate {expr}.", "Can you compute {expr}?"],
        "k_ans": "The result of {expr} is {result}.",
        "k2_req": ["Calculate {expr1} and {expr2}."],
        "k2_ans": "{expr1} = {result1} and {expr2} = {result2}.",
        "k_follow": "And {expr}?",
        "t_req": ['Translate "{text}" into {lang}.', 'How do you say "{text}" in {lang}?'],
        "t_ans": 'In {lang}, "{text}" is "{translation}".',
        "t2_req": ["Translate \"{text}\" into {lang1} and {lang2}."],
        "t2_ans": "In {lang1}: \"{tr1}\"; in {lang2}: \"{tr2}\".",
        "greet": [("Hello!", "Hello! How can I help you today?"),
                  ("Hi, how are you?", "I'm doing well, thank you! What can I do for you?")],
        "thanks": ("Thanks!", "You're welcome! Let me know if you need anything else."),
        "caps_req": "What can you do?",
        "caps_ans": "I can {list}.",
        "caps": {"get_weather": "check the weather", "convert_currency": "convert currencies",
                 "create_event": "add events to your calendar", "search_flights": "search for flights",
                 "calculate": "do calculations", "translate": "translate text"},
        "and": " and ",
        "p_weather": "Weather report for {date}.",
        "p_order": "Order {oid} from {name}:",
        "p_total": "Total: {total} EUR.",
        "p_cal": "Calendar of {name}:",
        "p_cal_line": "{date} at {time}: {title}.",
        "p_units": "Unit conversions:",
        "p_math": "Arithmetic facts:",
        "p_rates": "Exchange rates today:",
        "p_departures": "Departures from {origin} on {date}:",
        "p_phrases": "Phrase book, {lang1} to {lang2}:",
    },
    "fr": {
        "w_req": ["Quel temps fait-il à {city} ?", "Quelle est la météo à {city} aujourd'hui ?",
                  "Peux-tu vérifier la météo à {city} ?"],
        "w_req_unit": ["Quel temps fait-il à {city} en degrés {unit} ?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["Quel temps fait-il à {city1} et à {city2} ?"],
        "w2_ans": "À {city1}, il fait {temp1} {deg} ({cond1}) ; à {city2}, {temp2} {deg} ({cond2}).",
        "w_ans": "À {city}, il fait {temp} {deg} et le temps est {cond}.",
        "w_follow": "Et à {city} ?",
        "c_req": ["Convertis {amount} {from} en {to}.", "Combien font {amount} {from} en {to} ?"],
        "c_ans": "{amount} {from} font {result} {to}.",
        "e_req": ["Ajoute « {title} » à mon agenda le {date} à {time}.",
                  "Planifie « {title} » pour le {date} à {time}."],
        "e_ans": "C'est fait ! « {title} » a été ajouté à ton agenda.",
        "f_req": ["Trouve des vols de {origin} à {dest} le {date}.",
                  "Y a-t-il des vols de {origin} à {dest} le {date} ?"],
        "f_ans": "Vols de {origin} à {dest} : {list}.",
        "f_item": "{flight} à {dep} ({price} EUR)",
        "f_join": " ; ",
        "f_none": "Désolé, il n'y a aucun vol de {origin} à {dest} ce jour-là.",
        "k_req": ["Combien font {expr} ?", "Calcule {expr}."],
        "k_ans": "Le résultat de {expr} est {result}.",
        "k2_req": ["Calcule {expr1} et {expr2}."],
        "k2_ans": "{expr1} = {result1} et {expr2} = {result2}.",
        "k_follow": "Et {expr} ?",
        "t_req": ["Traduis « {text} » en {lang}.", "Comment dit-on « {text} » en {lang} ?"],
        "t_ans": "En {lang}, « {text} » se dit « {translation} ».",
        "t2_req": ["Traduis « {text} » en {lang1} et en {lang2}."],
        "t2_ans": "En {lang1} : « {tr1} » ; en {lang2} : « {tr2} ».",
        "greet": [("Bonjour !", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
                  ("Salut, ça va ?", "Très bien, merci ! Que puis-je faire pour vous ?")],
        "thanks": ("Merci !", "Avec plaisir ! N'hésitez pas si vous avez besoin d'autre chose."),
        "caps_req": "Que peux-tu faire ?",
        "caps_ans": "Je peux {list}.",
        "caps": {"get_weather": "consulter la météo", "convert_currency": "convertir des devises",
                 "create_event": "ajouter des événements à ton agenda", "search_flights": "chercher des vols",
                 "calculate": "faire des calculs", "translate": "traduire des textes"},
        "and": " et ",
        "p_weather": "Bulletin météo du {date}.",
        "p_order": "Commande {oid} de {name} :",
        "p_total": "Total : {total} EUR.",
        "p_cal": "Agenda de {name} :",
        "p_cal_line": "{date} à {time} : {title}.",
        "p_units": "Conversions d'unités :",
        "p_math": "Calculs :",
        "p_rates": "Taux de change du jour :",
        "p_departures": "Départs de {origin} le {date} :",
        "p_phrases": "Guide de conversation, {lang1} vers {lang2} :",
    },
    "de": {
        "w_req": ["Wie ist das Wetter in {city}?", "Wie wird das Wetter heute in {city}?",
                  "Kannst du das Wetter in {city} prüfen?"],
        "w_req_unit": ["Wie ist das Wetter in {city} in Grad {unit}?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["Wie ist das Wetter in {city1} und {city2}?"],
        "w2_ans": "In {city1} sind es {temp1} {deg} ({cond1}), in {city2} {temp2} {deg} ({cond2}).",
        "w_ans": "In {city} sind es {temp} {deg} und es ist {cond}.",
        "w_follow": "Und in {city}?",
        "c_req": ["Rechne {amount} {from} in {to} um.", "Wie viel sind {amount} {from} in {to}?"],
        "c_ans": "{amount} {from} sind {result} {to}.",
        "e_req": ["Trag „{title}“ am {date} um {time} in meinen Kalender ein.",
                  "Plane „{title}“ für den {date} um {time}."],
        "e_ans": "Erledigt! „{title}“ steht jetzt in deinem Kalender.",
        "f_req": ["Suche Flüge von {origin} nach {dest} am {date}.",
                  "Gibt es am {date} Flüge von {origin} nach {dest}?"],
        "f_ans": "Flüge von {origin} nach {dest}: {list}.",
        "f_item": "{flight} um {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "Leider gibt es an diesem Tag keine Flüge von {origin} nach {dest}.",
        "k_req": ["Was ist {expr}?", "Berechne {expr}."],
        "k_ans": "Das Ergebnis von {expr} ist {result}.",
        "k2_req": ["Berechne {expr1} und {expr2}."],
        "k2_ans": "{expr1} = {result1} und {expr2} = {result2}.",
        "k_follow": "Und {expr}?",
        "t_req": ["Übersetze „{text}“ auf {lang}.", "Wie sagt man „{text}“ auf {lang}?"],
        "t_ans": "Auf {lang} heißt „{text}“ „{translation}“.",
        "t2_req": ["Übersetze „{text}“ auf {lang1} und {lang2}."],
        "t2_ans": "Auf {lang1}: „{tr1}“; auf {lang2}: „{tr2}“.",
        "greet": [("Hallo!", "Hallo! Wie kann ich dir heute helfen?"),
                  ("Hi, wie geht's?", "Mir geht es gut, danke! Was kann ich für dich tun?")],
        "thanks": ("Danke!", "Gern geschehen! Sag Bescheid, wenn du noch etwas brauchst."),
        "caps_req": "Was kannst du?",
        "caps_ans": "Ich kann {list}.",
        "caps": {"get_weather": "das Wetter abrufen", "convert_currency": "Währungen umrechnen",
                 "create_event": "Termine in deinen Kalender eintragen", "search_flights": "Flüge suchen",
                 "calculate": "Berechnungen durchführen", "translate": "Texte übersetzen"},
        "and": " und ",
        "p_weather": "Wetterbericht für den {date}.",
        "p_order": "Bestellung {oid} von {name}:",
        "p_total": "Summe: {total} EUR.",
        "p_cal": "Kalender von {name}:",
        "p_cal_line": "{date} um {time}: {title}.",
        "p_units": "Einheitenumrechnungen:",
        "p_math": "Rechenaufgaben:",
        "p_rates": "Wechselkurse heute:",
        "p_departures": "Abflüge von {origin} am {date}:",
        "p_phrases": "Sprachführer, {lang1} nach {lang2}:",
    },
    "es": {
        "w_req": ["¿Qué tiempo hace en {city}?", "¿Cómo está el clima hoy en {city}?",
                  "¿Puedes consultar el tiempo en {city}?"],
        "w_req_unit": ["¿Qué tiempo hace en {city} en grados {unit}?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["¿Qué tiempo hace en {city1} y en {city2}?"],
        "w2_ans": "En {city1} hace {temp1} {deg} ({cond1}); en {city2}, {temp2} {deg} ({cond2}).",
        "w_ans": "En {city} hace {temp} {deg} y el tiempo está {cond}.",
        "w_follow": "¿Y en {city}?",
        "c_req": ["Convierte {amount} {from} a {to}.", "¿Cuánto son {amount} {from} en {to}?"],
        "c_ans": "{amount} {from} son {result} {to}.",
        "e_req": ["Añade «{title}» a mi calendario el {date} a las {time}.",
                  "Programa «{title}» para el {date} a las {time}."],
        "e_ans": "¡Listo! «{title}» se ha añadido a tu calendario.",
        "f_req": ["Busca vuelos de {origin} a {dest} el {date}.", "¿Hay vuelos de {origin} a {dest} el {date}?"],
        "f_ans": "Vuelos de {origin} a {dest}: {list}.",
        "f_item": "{flight} a las {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "Lo siento, ese día no hay vuelos de {origin} a {dest}.",
        "k_req": ["¿Cuánto es {expr}?", "Calcula {expr}."],
        "k_ans": "El resultado de {expr} es {result}.",
        "k2_req": ["Calcula {expr1} y {expr2}."],
        "k2_ans": "{expr1} = {result1} y {expr2} = {result2}.",
        "k_follow": "¿Y {expr}?",
        "t_req": ["Traduce «{text}» al {lang}.", "¿Cómo se dice «{text}» en {lang}?"],
        "t_ans": "En {lang}, «{text}» se dice «{translation}».",
        "t2_req": ["Traduce «{text}» al {lang1} y al {lang2}."],
        "t2_ans": "En {lang1}: «{tr1}»; en {lang2}: «{tr2}».",
        "greet": [("¡Hola!", "¡Hola! ¿En qué puedo ayudarte hoy?"),
                  ("Hola, ¿qué tal?", "¡Muy bien, gracias! ¿Qué puedo hacer por ti?")],
        "thanks": ("¡Gracias!", "¡De nada! Avísame si necesitas algo más."),
        "caps_req": "¿Qué puedes hacer?",
        "caps_ans": "Puedo {list}.",
        "caps": {"get_weather": "consultar el tiempo", "convert_currency": "convertir divisas",
                 "create_event": "añadir eventos a tu calendario", "search_flights": "buscar vuelos",
                 "calculate": "hacer cálculos", "translate": "traducir textos"},
        "and": " y ",
        "p_weather": "Parte meteorológico del {date}.",
        "p_order": "Pedido {oid} de {name}:",
        "p_total": "Total: {total} EUR.",
        "p_cal": "Agenda de {name}:",
        "p_cal_line": "{date} a las {time}: {title}.",
        "p_units": "Conversiones de unidades:",
        "p_math": "Operaciones aritméticas:",
        "p_rates": "Tipos de cambio de hoy:",
        "p_departures": "Salidas desde {origin} el {date}:",
        "p_phrases": "Guía de frases, del {lang1} al {lang2}:",
    },
    "it": {
        "w_req": ["Che tempo fa a {city}?", "Com'è il meteo oggi a {city}?", "Puoi controllare il meteo a {city}?"],
        "w_req_unit": ["Che tempo fa a {city} in gradi {unit}?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["Che tempo fa a {city1} e a {city2}?"],
        "w2_ans": "A {city1} ci sono {temp1} {deg} ({cond1}); a {city2}, {temp2} {deg} ({cond2}).",
        "w_ans": "A {city} ci sono {temp} {deg} e il tempo è {cond}.",
        "w_follow": "E a {city}?",
        "c_req": ["Converti {amount} {from} in {to}.", "Quanto sono {amount} {from} in {to}?"],
        "c_ans": "{amount} {from} sono {result} {to}.",
        "e_req": ['Aggiungi "{title}" al mio calendario il {date} alle {time}.',
                  'Pianifica "{title}" per il {date} alle {time}.'],
        "e_ans": "Fatto! \"{title}\" è stato aggiunto al tuo calendario.",
        "f_req": ["Cerca voli da {origin} a {dest} il {date}.", "Ci sono voli da {origin} a {dest} il {date}?"],
        "f_ans": "Voli da {origin} a {dest}: {list}.",
        "f_item": "{flight} alle {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "Mi dispiace, quel giorno non ci sono voli da {origin} a {dest}.",
        "k_req": ["Quanto fa {expr}?", "Calcola {expr}."],
        "k_ans": "Il risultato di {expr} è {result}.",
        "k2_req": ["Calcola {expr1} e {expr2}."],
        "k2_ans": "{expr1} = {result1} e {expr2} = {result2}.",
        "k_follow": "E {expr}?",
        "t_req": ['Traduci "{text}" in {lang}.', 'Come si dice "{text}" in {lang}?'],
        "t_ans": 'In {lang}, "{text}" si dice "{translation}".',
        "t2_req": ["Traduci \"{text}\" in {lang1} e in {lang2}."],
        "t2_ans": "In {lang1}: \"{tr1}\"; in {lang2}: \"{tr2}\".",
        "greet": [("Ciao!", "Ciao! Come posso aiutarti oggi?"),
                  ("Ciao, come stai?", "Sto bene, grazie! Cosa posso fare per te?")],
        "thanks": ("Grazie!", "Prego! Fammi sapere se ti serve altro."),
        "caps_req": "Cosa sai fare?",
        "caps_ans": "Posso {list}.",
        "caps": {"get_weather": "controllare il meteo", "convert_currency": "convertire valute",
                 "create_event": "aggiungere eventi al tuo calendario", "search_flights": "cercare voli",
                 "calculate": "fare calcoli", "translate": "tradurre testi"},
        "and": " e ",
        "p_weather": "Bollettino meteo del {date}.",
        "p_order": "Ordine {oid} di {name}:",
        "p_total": "Totale: {total} EUR.",
        "p_cal": "Agenda di {name}:",
        "p_cal_line": "{date} alle {time}: {title}.",
        "p_units": "Conversioni di unità:",
        "p_math": "Operazioni aritmetiche:",
        "p_rates": "Tassi di cambio di oggi:",
        "p_departures": "Partenze da {origin} il {date}:",
        "p_phrases": "Frasario, da {lang1} a {lang2}:",
    },
    "pt": {
        "w_req": ["Como está o tempo em {city}?", "Qual é a previsão do tempo hoje em {city}?",
                  "Você pode verificar o clima em {city}?"],
        "w_req_unit": ["Como está o tempo em {city} em graus {unit}?"],
        "units": {"celsius": "Celsius", "fahrenheit": "Fahrenheit"},
        "w2_req": ["Como está o tempo em {city1} e em {city2}?"],
        "w2_ans": "Em {city1} faz {temp1} {deg} ({cond1}); em {city2}, {temp2} {deg} ({cond2}).",
        "w_ans": "Em {city} faz {temp} {deg} e o tempo está {cond}.",
        "w_follow": "E em {city}?",
        "c_req": ["Converta {amount} {from} para {to}.", "Quanto são {amount} {from} em {to}?"],
        "c_ans": "{amount} {from} são {result} {to}.",
        "e_req": ['Adicione "{title}" à minha agenda em {date} às {time}.', 'Agende "{title}" para {date} às {time}.'],
        "e_ans": "Pronto! \"{title}\" foi adicionado à sua agenda.",
        "f_req": ["Procure voos de {origin} para {dest} em {date}.", "Há voos de {origin} para {dest} em {date}?"],
        "f_ans": "Voos de {origin} para {dest}: {list}.",
        "f_item": "{flight} às {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "Desculpe, não há voos de {origin} para {dest} nesse dia.",
        "k_req": ["Quanto é {expr}?", "Calcule {expr}."],
        "k_ans": "O resultado de {expr} é {result}.",
        "k2_req": ["Calcule {expr1} e {expr2}."],
        "k2_ans": "{expr1} = {result1} e {expr2} = {result2}.",
        "k_follow": "E {expr}?",
        "t_req": ['Traduza "{text}" para o {lang}.', 'Como se diz "{text}" em {lang}?'],
        "t_ans": 'Em {lang}, "{text}" se diz "{translation}".',
        "t2_req": ["Traduza \"{text}\" para o {lang1} e para o {lang2}."],
        "t2_ans": "Em {lang1}: \"{tr1}\"; em {lang2}: \"{tr2}\".",
        "greet": [("Olá!", "Olá! Como posso ajudar hoje?"),
                  ("Oi, tudo bem?", "Tudo ótimo, obrigado! O que posso fazer por você?")],
        "thanks": ("Obrigado!", "De nada! Avise se precisar de mais alguma coisa."),
        "caps_req": "O que você pode fazer?",
        "caps_ans": "Posso {list}.",
        "caps": {"get_weather": "verificar o tempo", "convert_currency": "converter moedas",
                 "create_event": "adicionar eventos à sua agenda", "search_flights": "procurar voos",
                 "calculate": "fazer cálculos", "translate": "traduzir textos"},
        "and": " e ",
        "p_weather": "Boletim do tempo de {date}.",
        "p_order": "Pedido {oid} de {name}:",
        "p_total": "Total: {total} EUR.",
        "p_cal": "Agenda de {name}:",
        "p_cal_line": "{date} às {time}: {title}.",
        "p_units": "Conversões de unidades:",
        "p_math": "Operações aritméticas:",
        "p_rates": "Câmbio de hoje:",
        "p_departures": "Partidas de {origin} em {date}:",
        "p_phrases": "Guia de frases, do {lang1} para o {lang2}:",
    },
    "zh": {
        "w_req": ["{city}的天气怎么样？", "今天{city}天气如何？", "帮我查一下{city}的天气。"],
        "w_req_unit": ["用{unit}告诉我{city}的天气。"],
        "units": {"celsius": "摄氏度", "fahrenheit": "华氏度"},
        "w2_req": ["{city1}和{city2}的天气怎么样？"],
        "w2_ans": "{city1}现在{temp1}{deg}，{cond1}；{city2}现在{temp2}{deg}，{cond2}。",
        "w_ans": "{city}现在{temp}{deg}，天气{cond}。",
        "w_follow": "那{city}呢？",
        "c_req": ["把{amount}{from}换算成{to}。", "{amount}{from}等于多少{to}？"],
        "c_ans": "{amount} {from} 等于 {result} {to}。",
        "e_req": ["在{date} {time}把“{title}”加到我的日历里。", "帮我安排{date} {time}的“{title}”。"],
        "e_ans": "好的！“{title}”已添加到你的日历。",
        "f_req": ["帮我查{date}从{origin}到{dest}的航班。", "{date}有从{origin}飞往{dest}的航班吗？"],
        "f_ans": "从{origin}到{dest}的航班：{list}。",
        "f_item": "{flight}，{dep}起飞（{price} EUR）",
        "f_join": "；",
        "f_none": "抱歉，当天没有从{origin}到{dest}的航班。",
        "k_req": ["{expr}等于多少？", "帮我算一下{expr}。"],
        "k_ans": "{expr}的结果是{result}。",
        "k2_req": ["帮我算一下{expr1}和{expr2}。"],
        "k2_ans": "{expr1} = {result1}，{expr2} = {result2}。",
        "k_follow": "那{expr}呢？",
        "t_req": ["把“{text}”翻译成{lang}。", "“{text}”用{lang}怎么说？"],
        "t_ans": "“{text}”的{lang}是“{translation}”。",
        "t2_req": ["把“{text}”翻译成{lang1}和{lang2}。"],
        "t2_ans": "{lang1}：“{tr1}”；{lang2}：“{tr2}”。",
        "greet": [("你好！", "你好！今天有什么可以帮你的？"), ("嗨，最近怎么样？", "我很好，谢谢！有什么需要帮忙的吗？")],
        "thanks": ("谢谢！", "不客气！还有其他需要随时告诉我。"),
        "caps_req": "你能做什么？",
        "caps_ans": "我可以{list}。",
        "caps": {"get_weather": "查询天气", "convert_currency": "换算货币", "create_event": "在日历中添加日程",
                 "search_flights": "搜索航班", "calculate": "进行计算", "translate": "翻译文本"},
        "and": "和",
        "p_weather": "{date}天气预报。",
        "p_order": "{name}的订单{oid}：",
        "p_total": "合计：{total} EUR。",
        "p_cal": "{name}的日程：",
        "p_cal_line": "{date} {time}：{title}。",
        "p_units": "单位换算：",
        "p_math": "算术：",
        "p_rates": "今日汇率：",
        "p_departures": "{date}从{origin}出发的航班：",
        "p_phrases": "常用语，{lang1}到{lang2}：",
    },
    "ja": {
        "w_req": ["{city}の天気はどうですか？", "今日の{city}の天気を教えてください。", "{city}の天気を調べてもらえますか？"],
        "w_req_unit": ["{city}の天気を{unit}で教えてください。"],
        "units": {"celsius": "摂氏", "fahrenheit": "華氏"},
        "w2_req": ["{city1}と{city2}の天気はどうですか？"],
        "w2_ans": "{city1}は{temp1}{deg}で{cond1}、{city2}は{temp2}{deg}で{cond2}です。",
        "w_ans": "{city}は現在{temp}{deg}で、天気は{cond}です。",
        "w_follow": "{city}はどうですか？",
        "c_req": ["{amount}{from}を{to}に換算してください。", "{amount}{from}は{to}でいくらですか？"],
        "c_ans": "{amount} {from} は {result} {to} です。",
        "e_req": ["{date}の{time}に「{title}」をカレンダーに追加してください。", "{date} {time}に「{title}」の予定を入れてください。"],
        "e_ans": "完了しました！「{title}」をカレンダーに追加しました。",
        "f_req": ["{date}の{origin}発{dest}行きのフライトを探してください。", "{date}に{origin}から{dest}への便はありますか？"],
        "f_ans": "{origin}発{dest}行きの便：{list}。",
        "f_item": "{flight}（{dep}発、{price} EUR）",
        "f_join": "、",
        "f_none": "申し訳ありませんが、その日の{origin}発{dest}行きの便はありません。",
        "k_req": ["{expr}はいくつですか？", "{expr}を計算してください。"],
        "k_ans": "{expr}の答えは{result}です。",
        "k2_req": ["{expr1}と{expr2}を計算してください。"],
        "k2_ans": "{expr1} = {result1}、{expr2} = {result2}です。",
        "k_follow": "では{expr}は？",
        "t_req": ["「{text}」を{lang}に翻訳してください。", "「{text}」は{lang}で何と言いますか？"],
        "t_ans": "「{text}」は{lang}で「{translation}」です。",
        "t2_req": ["「{text}」を{lang1}と{lang2}に翻訳してください。"],
        "t2_ans": "{lang1}では「{tr1}」、{lang2}では「{tr2}」です。",
        "greet": [("こんにちは！", "こんにちは！今日は何をお手伝いしましょうか？"),
                  ("元気ですか？", "はい、元気です！何かお手伝いできることはありますか？")],
        "thanks": ("ありがとう！", "どういたしまして！他に何かあれば教えてください。"),
        "caps_req": "何ができますか？",
        "caps_ans": "{list}ことができます。",
        "caps": {"get_weather": "天気を調べる", "convert_currency": "通貨を換算する",
                 "create_event": "カレンダーに予定を追加する", "search_flights": "フライトを検索する",
                 "calculate": "計算する", "translate": "文章を翻訳する"},
        "and": "、",
        "p_weather": "{date}の天気予報。",
        "p_order": "{name}さんの注文{oid}：",
        "p_total": "合計：{total} EUR。",
        "p_cal": "{name}さんの予定：",
        "p_cal_line": "{date} {time}：{title}。",
        "p_units": "単位換算：",
        "p_math": "計算：",
        "p_rates": "本日の為替レート：",
        "p_departures": "{date}の{origin}発の便：",
        "p_phrases": "会話集、{lang1}から{lang2}へ：",
    },
    "ru": {
        "w_req": ["Какая погода в городе {city}?", "Какая сегодня погода в городе {city}?",
                  "Можешь проверить погоду в городе {city}?"],
        "w_req_unit": ["Какая погода в городе {city} в градусах {unit}?"],
        "units": {"celsius": "Цельсия", "fahrenheit": "Фаренгейта"},
        "w2_req": ["Какая погода в городах {city1} и {city2}?"],
        "w2_ans": "В городе {city1} {temp1} {deg}, {cond1}; в городе {city2} {temp2} {deg}, {cond2}.",
        "w_ans": "В городе {city} сейчас {temp} {deg}, {cond}.",
        "w_follow": "А в городе {city}?",
        "c_req": ["Конвертируй {amount} {from} в {to}.", "Сколько будет {amount} {from} в {to}?"],
        "c_ans": "{amount} {from} = {result} {to}.",
        "e_req": ["Добавь «{title}» в мой календарь на {date} в {time}.", "Запланируй «{title}» на {date} в {time}."],
        "e_ans": "Готово! «{title}» добавлено в календарь.",
        "f_req": ["Найди рейсы из города {origin} в город {dest} на {date}.",
                  "Есть ли рейсы из города {origin} в город {dest} на {date}?"],
        "f_ans": "Рейсы из города {origin} в город {dest}: {list}.",
        "f_item": "{flight} в {dep} ({price} EUR)",
        "f_join": "; ",
        "f_none": "К сожалению, в этот день рейсов из города {origin} в город {dest} нет.",
        "k_req": ["Сколько будет {expr}?", "Вычисли {expr}."],
        "k_ans": "Результат {expr}: {result}.",
        "k2_req": ["Вычисли {expr1} и {expr2}."],
        "k2_ans": "{expr1} = {result1}, {expr2} = {result2}.",
        "k_follow": "А {expr}?",
        "t_req": ["Переведи «{text}» на {lang}.", "Нужен перевод «{text}» на {lang}."],
        "t_ans": "Перевод «{text}» на {lang}: «{translation}».",
        "t2_req": ["Переведи «{text}» на {lang1} и {lang2}."],
        "t2_ans": "На {lang1}: «{tr1}»; на {lang2}: «{tr2}».",
        "greet": [("Привет!", "Привет! Чем могу помочь сегодня?"),
                  ("Здравствуй, как дела?", "Отлично, спасибо! Что я могу для тебя сделать?")],
        "thanks": ("Спасибо!", "Пожалуйста! Обращайся, если нужно что-то ещё."),
        "caps_req": "Что ты умеешь?",
        "caps_ans": "Я могу {list}.",
        "caps": {"get_weather": "узнавать погоду", "convert_currency": "конвертировать валюты",
                 "create_event": "добавлять события в календарь", "search_flights": "искать авиарейсы",
                 "calculate": "выполнять вычисления", "translate": "переводить тексты"},
        "and": " и ",
        "p_weather": "Прогноз погоды на {date}.",
        "p_order": "Заказ {oid} от {name}:",
        "p_total": "Итого: {total} EUR.",
        "p_cal": "Календарь: {name}.",
        "p_cal_line": "{date} в {time}: {title}.",
        "p_units": "Перевод единиц:",
        "p_math": "Арифметика:",
        "p_rates": "Курсы валют на сегодня:",
        "p_departures": "Вылеты из города {origin} на {date}:",
        "p_phrases": "Разговорник, {lang1} → {lang2}:",
    },
    "ar": {
        "w_req": ["كيف الطقس في {city}؟", "ما حالة الطقس اليوم في {city}؟", "هل يمكنك معرفة الطقس في {city}؟"],
        "w_req_unit": ["كيف الطقس في {city} بدرجات {unit}؟"],
        "units": {"celsius": "مئوية", "fahrenheit": "فهرنهايت"},
        "w2_req": ["كيف الطقس في {city1} و{city2}؟"],
        "w2_ans": "في {city1} {temp1} {deg} والطقس {cond1}، وفي {city2} {temp2} {deg} والطقس {cond2}.",
        "w_ans": "في {city} درجة الحرارة {temp} {deg} والطقس {cond}.",
        "w_follow": "وماذا عن {city}؟",
        "c_req": ["حوّل {amount} {from} إلى {to}.", "كم يساوي {amount} {from} بعملة {to}؟"],
        "c_ans": "{amount} {from} تساوي {result} {to}.",
        "e_req": ['أضف "{title}" إلى تقويمي يوم {date} الساعة {time}.', 'حدد موعد "{title}" يوم {date} الساعة {time}.'],
        "e_ans": "تم! أُضيف \"{title}\" إلى تقويمك.",
        "f_req": ["ابحث عن رحلات من {origin} إلى {dest} يوم {date}.",
                  "هل توجد رحلات من {origin} إلى {dest} يوم {date}؟"],
        "f_ans": "الرحلات من {origin} إلى {dest}: {list}.",
        "f_item": "{flight} الساعة {dep} ({price} EUR)",
        "f_join": "؛ ",
        "f_none": "عذرًا، لا توجد رحلات من {origin} إلى {dest} في ذلك اليوم.",
        "k_req": ["كم يساوي {expr}؟", "احسب {expr}."],
        "k_ans": "ناتج {expr} هو {result}.",
        "k2_req": ["احسب {expr1} و{expr2}."],
        "k2_ans": "{expr1} = {result1} و{expr2} = {result2}.",
        "k_follow": "وماذا عن {expr}؟",
        "t_req": ['ترجم "{text}" إلى {lang}.', 'كيف أقول "{text}" ب{lang}؟'],
        "t_ans": 'ترجمة "{text}" إلى {lang} هي "{translation}".',
        "t2_req": ["ترجم \"{text}\" إلى {lang1} و{lang2}."],
        "t2_ans": "إلى {lang1}: \"{tr1}\"، وإلى {lang2}: \"{tr2}\".",
        "greet": [("مرحبًا!", "مرحبًا! كيف يمكنني مساعدتك اليوم؟"),
                  ("أهلًا، كيف حالك؟", "بخير، شكرًا! ماذا يمكنني أن أفعل لك؟")],
        "thanks": ("شكرًا!", "على الرحب والسعة! أخبرني إذا احتجت أي شيء آخر."),
        "caps_req": "ماذا يمكنك أن تفعل؟",
        "caps_ans": "يمكنني {list}.",
        "caps": {"get_weather": "معرفة الطقس", "convert_currency": "تحويل العملات",
                 "create_event": "إضافة مواعيد إلى تقويمك", "search_flights": "البحث عن رحلات",
                 "calculate": "إجراء العمليات الحسابية", "translate": "ترجمة النصوص"},
        "and": " و",
        "p_weather": "النشرة الجوية ليوم {date}.",
        "p_order": "طلب {oid} من {name}:",
        "p_total": "المجموع: {total} EUR.",
        "p_cal": "تقويم {name}:",
        "p_cal_line": "{date} الساعة {time}: {title}.",
        "p_units": "تحويل الوحدات:",
        "p_math": "حقائق حسابية:",
        "p_rates": "أسعار الصرف اليوم:",
        "p_departures": "الرحلات المغادرة من {origin} يوم {date}:",
        "p_phrases": "دليل العبارات، من {lang1} إلى {lang2}:",
    },
    "hi": {
        "w_req": ["{city} में मौसम कैसा है?", "आज {city} में मौसम कैसा है?", "क्या आप {city} का मौसम बता सकते हैं?"],
        "w_req_unit": ["{city} का मौसम {unit} में बताइए।"],
        "units": {"celsius": "सेल्सियस", "fahrenheit": "फ़ारेनहाइट"},
        "w2_req": ["{city1} और {city2} में मौसम कैसा है?"],
        "w2_ans": "{city1} में {temp1} {deg} और {cond1} है, जबकि {city2} में {temp2} {deg} और {cond2} है।",
        "w_ans": "{city} में अभी {temp} {deg} है और मौसम में {cond} है।",
        "w_follow": "और {city} में?",
        "c_req": ["{amount} {from} को {to} में बदलिए।", "{amount} {from} कितने {to} होते हैं?"],
        "c_ans": "{amount} {from} = {result} {to}।",
        "e_req": ['{date} को {time} बजे "{title}" मेरे कैलेंडर में जोड़ दीजिए।',
                  '{date} को {time} बजे "{title}" शेड्यूल कीजिए।'],
        "e_ans": "हो गया! \"{title}\" आपके कैलेंडर में जोड़ दिया गया है।",
        "f_req": ["{date} को {origin} से {dest} की उड़ानें खोजिए।",
                  "क्या {date} को {origin} से {dest} के लिए उड़ानें हैं?"],
        "f_ans": "{origin} से {dest} की उड़ानें: {list}।",
        "f_item": "{flight} {dep} बजे ({price} EUR)",
        "f_join": "; ",
        "f_none": "माफ़ कीजिए, उस दिन {origin} से {dest} के लिए कोई उड़ान नहीं है।",
        "k_req": ["{expr} कितना होता है?", "{expr} की गणना कीजिए।"],
        "k_ans": "{expr} का परिणाम {result} है।",
        "k2_req": ["{expr1} और {expr2} की गणना कीजिए।"],
        "k2_ans": "{expr1} = {result1} और {expr2} = {result2}।",
        "k_follow": "और {expr}?",
        "t_req": ['"{text}" का {lang} में अनुवाद कीजिए।', '{lang} में "{text}" कैसे कहते हैं?'],
        "t_ans": '"{text}" का {lang} अनुवाद "{translation}" है।',
        "t2_req": ["\"{text}\" का {lang1} और {lang2} में अनुवाद कीजिए।"],
        "t2_ans": "{lang1} में: \"{tr1}\"; {lang2} में: \"{tr2}\"।",
        "greet": [("नमस्ते!", "नमस्ते! आज मैं आपकी क्या मदद कर सकता हूँ?"),
                  ("हाय, आप कैसे हैं?", "मैं ठीक हूँ, धन्यवाद! मैं आपके लिए क्या कर सकता हूँ?")],
        "thanks": ("धन्यवाद!", "आपका स्वागत है! कुछ और चाहिए तो बताइए।"),
        "caps_req": "आप क्या कर सकते हैं?",
        "caps_ans": "मैं {list} सकता हूँ।",
        "caps": {"get_weather": "मौसम की जानकारी दे", "convert_currency": "मुद्रा बदल",
                 "create_event": "आपके कैलेंडर में कार्यक्रम जोड़", "search_flights": "उड़ानें खोज",
                 "calculate": "गणना कर", "translate": "अनुवाद कर"},
        "and": " और ",
        "p_weather": "{date} का मौसम समाचार।",
        "p_order": "{name} का ऑर्डर {oid}:",
        "p_total": "कुल: {total} EUR।",
        "p_cal": "{name} का कैलेंडर:",
        "p_cal_line": "{date} को {time} बजे: {title}।",
        "p_units": "इकाई रूपांतरण:",
        "p_math": "अंकगणित:",
        "p_rates": "आज की विनिमय दरें:",
        "p_departures": "{date} को {origin} से प्रस्थान:",
        "p_phrases": "वाक्यांश पुस्तिका, {lang1} से {lang2}:",
    },
}

SYSTEM_PROMPTS = [
    "You are a helpful assistant. Use the available tools when needed and answer in the user's language.",
    "You are a concise travel assistant. Reply in the language of the user.",
    "You are an assistant with access to tools. Call a tool only when it is needed.",
]

# --------------------------------------------------------------------------------------------------------------
# Tools (OpenAI function form, kept short: the definitions are part of every encoded conversation)
# --------------------------------------------------------------------------------------------------------------


def _fn(name, description, properties, required):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


_S = {"type": "string"}
TOOLS = {
    "get_weather": _fn("get_weather", "Get the current weather in a city.",
                       {"city": _S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    "convert_currency": _fn("convert_currency", "Convert an amount between currencies.",
                            {"amount": {"type": "number"}, "from": _S, "to": _S}, ["amount", "from", "to"]),
    "create_event": _fn("create_event", "Add an event to the calendar.",
                        {"title": _S, "date": _S, "time": _S}, ["title", "date", "time"]),
    "search_flights": _fn("search_flights", "Search for flights on a date.",
                          {"origin": _S, "destination": _S, "date": _S}, ["origin", "destination", "date"]),
    "calculate": _fn("calculate", "Evaluate an arithmetic expression.", {"expression": _S}, ["expression"]),
    "translate": _fn("translate", "Translate text into another language.",
                     {"text": _S, "target_language": _S}, ["text", "target_language"]),
}
TOOL_NAMES = list(TOOLS)

# Closed sets an argument may take without being copied from the user's words (the model learns the mapping).
CLOSED_ARG_VALUES = {("get_weather", "unit"): ["celsius", "fahrenheit"],
                     ("convert_currency", "from"): CURRENCIES, ("convert_currency", "to"): CURRENCIES,
                     ("translate", "target_language"): LANGS}

# --------------------------------------------------------------------------------------------------------------
# Random draws shared by the corpus and the conversations
# --------------------------------------------------------------------------------------------------------------


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def rand_date(rng: random.Random) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def rand_time(rng: random.Random) -> str:
    return f"{rng.randint(7, 21):02d}:{rng.choice(['00', '15', '30', '45'])}"


def rand_amount(rng: random.Random) -> int:
    return rng.choice([rng.randint(2, 99) * 5, rng.randint(1, 20) * 50, rng.randint(10, 999)])


def fmt_money(x: float) -> str:
    return f"{x:.2f}"


def rate(rng: random.Random, src: str, dst: str) -> float:
    r = USD_PER[src] / USD_PER[dst] * (1 + rng.uniform(-0.02, 0.02))
    return float(f"{r:.4g}")


def rand_expr(rng: random.Random) -> tuple[str, int]:
    kind = rng.randint(0, 4)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    if kind == 0:
        return f"{a} + {b}", a + b
    if kind == 1:
        return f"{a} - {b}", a - b
    if kind == 2:
        return f"{a} * {c}", a * c
    if kind == 3:
        return f"{a * c} / {c}", a
    return f"{a} * {c} + {b}", a * c + b


class Exchange:
    """One user request and the assistant's reaction: zero or more tool calls (name, args, result), an answer."""

    def __init__(self, user: str, calls: list[tuple[str, dict, dict]], answer: str):
        self.user, self.calls, self.answer = user, calls, answer


def ex_weather(rng, lang, city_row=None, with_unit=None) -> Exchange:
    t = T[lang]
    city = (city_row or rng.choice(CITIES))[lang]
    if with_unit is None:
        with_unit = rng.random() < 0.3
    args = {"city": city}
    if with_unit:
        unit = rng.choice(["celsius", "fahrenheit"])
        args["unit"] = unit
        user = rng.choice(t["w_req_unit"]).format(city=city, unit=t["units"][unit])
    else:
        unit = "celsius"
        user = rng.choice(t["w_req"]).format(city=city)
    result = weather_result(rng, unit)
    return Exchange(user, [("get_weather", args, result)], weather_answer(lang, city, result, unit))


def weather_result(rng, unit: str) -> dict:
    """The tool's reply; its temperature is in the unit asked for (celsius unless the user said otherwise)."""
    temp = rng.randint(-8, 36)
    if unit == "fahrenheit":
        temp = round(temp * 9 / 5 + 32)
    return {"temperature": temp, "condition": rng.choice(CONDITIONS)}


def weather_answer(lang: str, city: str, result: dict, unit: str = "celsius") -> str:
    deg = "°C" if unit == "celsius" else "°F"
    return T[lang]["w_ans"].format(city=city, temp=result["temperature"], deg=deg,
                                   cond=COND_NAMES[result["condition"]][lang])


def ex_weather2(rng, lang) -> Exchange:
    c1, c2 = rng.sample(CITIES, 2)
    r1, r2 = weather_result(rng, "celsius"), weather_result(rng, "celsius")
    user = rng.choice(T[lang]["w2_req"]).format(city1=c1[lang], city2=c2[lang])
    answer = T[lang]["w2_ans"].format(city1=c1[lang], temp1=r1["temperature"], cond1=COND_NAMES[r1["condition"]][lang],
                                      city2=c2[lang], temp2=r2["temperature"], cond2=COND_NAMES[r2["condition"]][lang],
                                      deg="°C")
    return Exchange(user, [("get_weather", {"city": c1[lang]}, r1), ("get_weather", {"city": c2[lang]}, r2)],
                    answer)


def _cur_word(lang, code, use_codes):
    return code if use_codes else CUR_NAMES[code][lang]


def currency_call(rng, lang, amount, src, dst):
    result = {"result": round(amount * rate(rng, src, dst), 2)}
    answer = T[lang]["c_ans"].format(amount=amount, result=fmt_money(result["result"]), **{"from": src, "to": dst})
    return ("convert_currency", {"amount": amount, "from": src, "to": dst}, result), answer


def ex_currency(rng, lang) -> Exchange:
    src, dst = rng.sample(CURRENCIES, 2)
    amount = rand_amount(rng)
    codes = rng.random() < 0.3
    user = rng.choice(T[lang]["c_req"]).format(amount=amount, **{"from": _cur_word(lang, src, codes),
                                                                "to": _cur_word(lang, dst, codes)})
    call, answer = currency_call(rng, lang, amount, src, dst)
    return Exchange(user, [call], answer)


def ex_event(rng, lang) -> Exchange:
    title, date, time_ = rng.choice(EVENT_TITLES[lang]), rand_date(rng), rand_time(rng)
    t = T[lang]
    user = rng.choice(t["e_req"]).format(title=title, date=date, time=time_)
    return Exchange(user, [("create_event", {"title": title, "date": date, "time": time_}, {"status": "created"})],
                    t["e_ans"].format(title=title))


def flight_list(rng, n):
    out = []
    for _ in range(n):
        out.append({"flight": f"{rng.choice(AIRLINES)}{rng.randint(100, 999)}", "departure": rand_time(rng),
                    "price": rng.randint(6, 90) * 5})
    out.sort(key=lambda f: f["departure"])
    return out


def ex_flights(rng, lang) -> Exchange:
    o, d = rng.sample(CITIES, 2)
    origin, dest, date = o[lang], d[lang], rand_date(rng)
    t = T[lang]
    user = rng.choice(t["f_req"]).format(origin=origin, dest=dest, date=date)
    flights = flight_list(rng, rng.choice([0, 1, 1, 1, 2]))
    if flights:
        items = t["f_join"].join(t["f_item"].format(flight=f["flight"], dep=f["departure"], price=f["price"])
                                 for f in flights)
        answer = t["f_ans"].format(origin=origin, dest=dest, list=items)
    else:
        answer = t["f_none"].format(origin=origin, dest=dest)
    args = {"origin": origin, "destination": dest, "date": date}
    return Exchange(user, [("search_flights", args, {"flights": flights})], answer)


def ex_calc(rng, lang) -> Exchange:
    expr, value = rand_expr(rng)
    t = T[lang]
    return Exchange(rng.choice(t["k_req"]).format(expr=expr),
                    [("calculate", {"expression": expr}, {"result": value})],
                    t["k_ans"].format(expr=expr, result=value))


def ex_calc2(rng, lang) -> Exchange:
    (e1, v1), (e2, v2) = rand_expr(rng), rand_expr(rng)
    t = T[lang]
    return Exchange(rng.choice(t["k2_req"]).format(expr1=e1, expr2=e2),
                    [("calculate", {"expression": e1}, {"result": v1}),
                     ("calculate", {"expression": e2}, {"result": v2})],
                    t["k2_ans"].format(expr1=e1, result1=v1, expr2=e2, result2=v2))


def ex_translate2(rng, lang) -> Exchange:
    phrase = rng.choice(PHRASES)
    l1, l2 = rng.sample([x for x in LANGS if x != lang], 2)
    t = T[lang]
    text, n1, n2 = phrase[lang], LANG_NAMES[l1][lang], LANG_NAMES[l2][lang]
    return Exchange(rng.choice(t["t2_req"]).format(text=text, lang1=n1, lang2=n2),
                    [("translate", {"text": text, "target_language": l1}, {"translation": phrase[l1]}),
                     ("translate", {"text": text, "target_language": l2}, {"translation": phrase[l2]})],
                    t["t2_ans"].format(lang1=n1, tr1=phrase[l1], lang2=n2, tr2=phrase[l2]))


def ex_translate(rng, lang) -> Exchange:
    phrase = rng.choice(PHRASES)
    target = rng.choice([x for x in LANGS if x != lang])
    t = T[lang]
    text, lang_name = phrase[lang], LANG_NAMES[target][lang]
    translation = phrase[target]
    return Exchange(rng.choice(t["t_req"]).format(text=text, lang=lang_name),
                    [("translate", {"text": text, "target_language": target}, {"translation": translation})],
                    t["t_ans"].format(text=text, lang=lang_name, translation=translation))


def ex_greet(rng, lang) -> Exchange:
    user, answer = rng.choice(T[lang]["greet"])
    return Exchange(user, [], answer)


def ex_thanks(rng, lang) -> Exchange:
    user, answer = T[lang]["thanks"]
    return Exchange(user, [], answer)


def ex_caps(lang, tool_names) -> Exchange:
    t = T[lang]
    return Exchange(t["caps_req"], [], t["caps_ans"].format(list=t["and"].join(t["caps"][n] for n in tool_names)))


SINGLE = {"get_weather": ex_weather, "convert_currency": ex_currency, "create_event": ex_event,
          "search_flights": ex_flights, "calculate": ex_calc, "translate": ex_translate}
PARALLEL = [ex_weather2, ex_calc2, ex_translate2]  # two currency conversions do not fit in 256 tokens

# --------------------------------------------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------------------------------------------


def _lines_weather(rng, lang):
    yield T[lang]["p_weather"].format(date=rand_date(rng))
    for row in rng.sample(CITIES, len(CITIES)):
        unit = rng.choice(["celsius", "celsius", "fahrenheit"])
        yield weather_answer(lang, row[lang], weather_result(rng, unit), unit)


def _lines_order(rng, lang):
    yield T[lang]["p_order"].format(oid=f"#{rng.randint(1000, 9999)}", name=rng.choice(NAMES[lang]))
    total = 0.0
    for i in rng.sample(range(len(ITEMS[lang])), rng.randint(2, 6)):
        qty = rng.randint(1, 6)
        sub = round(qty * ITEM_PRICES[i], 2)
        total = round(total + sub, 2)
        yield f"{qty} × {ITEMS[lang][i]} ({fmt_money(ITEM_PRICES[i])} EUR) = {fmt_money(sub)} EUR"
    yield T[lang]["p_total"].format(total=fmt_money(total))


def _lines_calendar(rng, lang):
    yield T[lang]["p_cal"].format(name=rng.choice(NAMES[lang]))
    month = rng.randint(1, 12)
    for day in sorted(rng.sample(range(1, 29), 8)):
        yield T[lang]["p_cal_line"].format(date=f"2025-{month:02d}-{day:02d}", time=rand_time(rng),
                                           title=rng.choice(EVENT_TITLES[lang]))


def _lines_units(rng, lang):
    yield T[lang]["p_units"]
    while True:
        kind = rng.randint(0, 4)
        a = rng.randint(1, 200)
        if kind == 0:
            yield f"{a} km = {a * 0.621371:.2f} mi"
        elif kind == 1:
            yield f"{a} kg = {a * 2.20462:.2f} lb"
        elif kind == 2:
            c = rng.randint(-20, 40)
            yield f"{c} °C = {c * 9 / 5 + 32:.1f} °F"
        elif kind == 3:
            yield f"{a} m = {a * 3.28084:.2f} ft"
        else:
            yield f"{a} L = {a * 0.264172:.2f} gal"


def _lines_math(rng, lang):
    yield T[lang]["p_math"]
    while True:
        expr, value = rand_expr(rng)
        if rng.random() < 0.25:
            yield T[lang]["k_ans"].format(expr=expr, result=value)
        else:
            yield f"{expr} = {value}"


def _lines_rates(rng, lang):
    yield T[lang]["p_rates"]
    while True:
        src, dst = rng.sample(CURRENCIES, 2)
        if rng.random() < 0.5:
            yield f"1 {src} = {rate(rng, src, dst)} {dst}"
        else:
            yield currency_call(rng, lang, rand_amount(rng), src, dst)[1]


def _lines_departures(rng, lang):
    o = rng.choice(CITIES)
    yield T[lang]["p_departures"].format(origin=o[lang], date=rand_date(rng))
    for f in flight_list(rng, 8):
        dest = rng.choice([c for c in CITIES if c is not o])[lang]
        yield f"{f['flight']} → {dest} {f['departure']} ({f['price']} EUR)"


def _lines_phrases(rng, lang):
    target = rng.choice([x for x in LANGS if x != lang])
    yield T[lang]["p_phrases"].format(lang1=LANG_NAMES[lang][lang], lang2=LANG_NAMES[target][lang])
    for p in rng.sample(PHRASES, len(PHRASES)):
        yield f"{p[lang]} = {p[target]}"


def _lines_toollog(rng, lang):
    """Plain-text transcripts of tool use: the request, its calls written as the JSON list the chat format puts
    after [TOOL_CALLS], the JSON results, the answer. With this layout in pretraining, fine-tuning starts from a
    model that already writes the calls' JSON (held-out valid-JSON calls after the demo's SFT, from 200 pretraining
    steps: 21 % with the earlier `name({...})` lines at weight 16, 70 % with these at weight 40)."""
    while True:
        ex = (rng.choice(PARALLEL) if rng.random() < 0.15 else SINGLE[rng.choice(TOOL_NAMES)])(rng, lang)
        calls = [{"name": name, "arguments": args} for name, args, _ in ex.calls]
        yield "\n".join([ex.user, dumps(calls), *(dumps(result) for _, _, result in ex.calls), ex.answer])


DOC_KINDS = [(_lines_weather, 15), (_lines_order, 11), (_lines_calendar, 11), (_lines_units, 8), (_lines_math, 12),
             (_lines_rates, 10), (_lines_departures, 9), (_lines_phrases, 8), (_lines_toollog, 40)]


def make_doc(rng, count_tokens) -> str:
    lang = rng.choice(LANGS)
    kind = rng.choices([k for k, _ in DOC_KINDS], weights=[w for _, w in DOC_KINDS])[0]
    target = rng.randint(DOC_MIN_TOKENS + 10, DOC_MAX_TOKENS)
    lines: list[str] = []
    for line in kind(rng, lang):
        n = count_tokens("\n".join([*lines, line]))
        if n > DOC_MAX_TOKENS:
            break
        lines.append(line)
        if n >= target:
            break
    text = "\n".join(lines)
    if count_tokens(text) < DOC_MIN_TOKENS:
        return ""  # too short (a generator that ran out of lines): the caller draws again
    return text


# --------------------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------------------

def call_id(n: int) -> str:
    """The n-th call's id in a conversation. mistral-common wants 9 letters or digits; counting instead of drawing
    them spares the small demo model learning to write random characters (tool_eval does not score ids)."""
    return f"call{n:05d}"


def to_messages(exchanges: list[Exchange]) -> list[dict]:
    msgs: list[dict] = []
    n_calls = 0
    for ex in exchanges:
        msgs.append({"role": "user", "content": ex.user})
        if ex.calls:
            ids = [call_id(n_calls + k + 1) for k in range(len(ex.calls))]
            n_calls += len(ex.calls)
            msgs.append({"role": "assistant", "tool_calls": [
                {"id": i, "type": "function", "function": {"name": name, "arguments": dumps(args)}}
                for i, (name, args, _) in zip(ids, ex.calls)]})
            for i, (name, _, result) in zip(ids, ex.calls):
                msgs.append({"role": "tool", "tool_call_id": i, "name": name, "content": dumps(result)})
        msgs.append({"role": "assistant", "content": ex.answer})
    return msgs


def draw_conversation(rng, n_tokens) -> dict | None:
    """One conversation, or None when it does not fit in MAX_TOKENS (the caller draws again).

    n_tokens(record) is its length in the V3 Tekken instruct encoding. An unused "distractor" tool is offered
    alongside the needed one(s) in part of the conversations, where it fits.
    """
    lang = rng.choice(LANGS)
    kind = rng.choices(["single", "parallel", "chat", "multi"], weights=[64, 12, 12, 12])[0]
    if kind == "single":
        exchanges = [SINGLE[rng.choice(TOOL_NAMES)](rng, lang)]
    elif kind == "parallel":
        exchanges = [rng.choice(PARALLEL)(rng, lang)]
    elif kind == "chat":
        exchanges = []  # filled in below, once the tools are known (the capability answer lists them)
    else:
        sub = rng.choices(range(4), weights=[3, 3, 2, 2])[0]
        if sub == 0:  # small talk, then a request
            exchanges = [ex_greet(rng, lang), SINGLE[rng.choice(TOOL_NAMES)](rng, lang)]
        elif sub == 1:  # a request, then thanks
            exchanges = [SINGLE[rng.choice(TOOL_NAMES)](rng, lang), ex_thanks(rng, lang)]
        elif sub == 2:  # weather, then a follow-up question about another city
            c1, c2 = rng.sample(CITIES, 2)
            first = ex_weather(rng, lang, c1, with_unit=False)
            second = ex_weather(rng, lang, c2, with_unit=False)
            second.user = T[lang]["w_follow"].format(city=c2[lang])
            exchanges = [first, second]
        else:  # a calculation, then a follow-up one
            first, second = ex_calc(rng, lang), ex_calc(rng, lang)
            second.user = T[lang]["k_follow"].format(expr=second.calls[0][1]["expression"])
            exchanges = [first, second]

    names: list[str] = []
    for ex in exchanges:
        for name, _, _ in ex.calls:
            if name not in names:
                names.append(name)
    if kind == "chat":
        names = rng.sample(TOOL_NAMES, rng.randint(1, 2))
        which = rng.randint(0, 2)
        exchanges = [ex_caps(lang, names)] if which == 0 else [ex_greet(rng, lang)]
        if which == 2:
            exchanges.append(ex_caps(lang, names))
    candidates = [n for n in TOOL_NAMES if n not in names]
    rng.shuffle(candidates)
    want_distractor = rng.random() < 0.3
    position = rng.randint(0, len(names))
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.08 else None

    messages = to_messages(exchanges)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    rec = {"messages": messages, "tools": [TOOLS[n] for n in names]}
    if n_tokens(rec) > MAX_TOKENS:
        return None
    if want_distractor and kind != "chat":
        for distractor in candidates:  # the first that fits
            with_distractor = {"messages": messages,
                               "tools": [TOOLS[n] for n in names[:position] + [distractor] + names[position:]]}
            if n_tokens(with_distractor) <= DISTRACTOR_MAX_TOKENS:
                return with_distractor
    return rec


# --------------------------------------------------------------------------------------------------------------
# Validation with mistral-common
# --------------------------------------------------------------------------------------------------------------

_TOOL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def load_mistral_tokenizer():
    """The V3 Tekken instruct tokenizer of Mistral NeMo, in finetuning validation mode.

    `MistralTokenizer.v3(is_tekken=True)` loads the packaged tekken_240718.json in *test* mode; we load the same
    file through `from_file` (which picks InstructTokenizerV3 from the file's "version": "v3") in finetuning
    mode, which requires the conversation to end with an assistant message (no `continue_final_message`).
    """
    import mistral_common
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    tok = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    assert type(tok.instruct_tokenizer).__name__ == "InstructTokenizerV3", type(tok.instruct_tokenizer)
    return tok


def check_structure(rec: dict) -> None:
    """Our own checks, stricter than mistral-common's finetuning validator (which tolerates missing results)."""
    msgs, tools = rec["messages"], rec["tools"]
    tool_names = [t["function"]["name"] for t in tools]
    assert len(set(tool_names)) == len(tool_names), "duplicate tool"
    i = 0
    if msgs[0]["role"] == "system":
        i = 1
    user_text = ""
    expect = "user"
    while i < len(msgs):
        m = msgs[i]
        assert m["role"] == expect or (expect == "assistant_or_done" and m["role"] == "user"), (m["role"], expect)
        if m["role"] == "user":
            user_text += m["content"] + "\n"
            expect = "assistant"
            i += 1
            continue
        assert m["role"] == "assistant"
        if "tool_calls" in m:
            assert "content" not in m
            calls = m["tool_calls"]
            assert 1 <= len(calls) <= 2
            for c, res in zip(calls, msgs[i + 1:i + 1 + len(calls)], strict=True):
                assert _TOOL_ID.match(c["id"]), c["id"]
                assert c["type"] == "function" and c["function"]["name"] in tool_names
                assert res["role"] == "tool" and res["tool_call_id"] == c["id"] and res["name"] == c["function"]["name"]
                json.loads(res["content"])
                args = json.loads(c["function"]["arguments"])
                spec = TOOLS[c["function"]["name"]]["function"]["parameters"]
                assert set(spec["required"]) <= set(args) <= set(spec["properties"]), args
                for k, v in args.items():  # every argument can be read off the user's words
                    closed = CLOSED_ARG_VALUES.get((c["function"]["name"], k))
                    if closed is not None and v in closed:
                        continue
                    assert str(v) in user_text, (k, v, user_text)
            i += 1 + len(calls)
            final = msgs[i]
            assert final["role"] == "assistant" and final.get("content") and "tool_calls" not in final
        else:
            assert m.get("content")
        i += 1
        expect = "user"
    assert msgs[-1]["role"] == "assistant" and msgs[-1].get("content")


def encode_conversation(tok, rec: dict) -> list[int]:
    """Encode one record with mistral-common; raises if it is not a valid V3 finetuning conversation."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(rec["messages"], tools=rec["tools"])
    return tok.encode_chat_completion(request).tokens


def _count_tokens_unvalidated(tok, rec: dict) -> int:
    """Length of the encoding without the request validator (half the cost is re-checking the same tool
    schemas): used only to size candidate conversations; the records kept are encoded with full validation."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    normalizer = getattr(tok, "_instruct_request_normalizer", None)
    if normalizer is None:
        return len(encode_conversation(tok, rec))
    request = ChatCompletionRequest.from_openai(rec["messages"], tools=rec["tools"])
    return len(tok.instruct_tokenizer.encode_instruct(normalizer.from_chat_completion_request(request)).tokens)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _jsonl(records: list[dict]) -> bytes:
    return "".join(dumps(r) + "\n" for r in records).encode("utf-8")


def gen_pretrain(seed: int, n: int, count_tokens, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        text = make_doc(rng, count_tokens)
        if text and text not in seen:
            seen.add(text)
            out.append({"text": text})
    return out


def gen_tools(seed: int, n: int, tok, exclude: set[str] = frozenset()) -> tuple[list[dict], list[int]]:
    rng = random.Random(seed)
    out, lengths, seen = [], [], set(exclude)
    def n_tokens(rec):
        return _count_tokens_unvalidated(tok, rec)

    while len(out) < n:
        rec = draw_conversation(rng, n_tokens)
        if rec is None:
            continue  # too long for the demo's seq_len: draw again
        check_structure(rec)
        length = len(encode_conversation(tok, rec))  # full mistral-common validation of every kept record
        assert length <= MAX_TOKENS, length
        key = dumps(rec)
        if key in seen:
            continue
        seen.add(key)
        out.append(rec)
        lengths.append(length)
    return out, lengths


def _arg_pool(recs: list[dict]) -> dict[tuple[str, str], list]:
    """Every value each (tool, argument) takes in `recs`, in first-seen order: what a wrong argument may be."""
    pool: dict[tuple[str, str], list] = {}
    for rec in recs:
        for m in rec["messages"]:
            for c in m.get("tool_calls", []):
                for k, v in json.loads(c["function"]["arguments"]).items():
                    values = pool.setdefault((c["function"]["name"], k), [])
                    if v not in values:
                        values.append(v)
    return pool


def gen_pairs(seed: int, recs: list[dict], pool) -> list[dict]:
    """One preference pair per conversation of `recs` with a tool call (module docstring)."""
    rng = random.Random(seed)
    out = []
    for rec in recs:
        turn = next((i for i, m in enumerate(rec["messages"]) if m.get("tool_calls")), None)
        if turn is None:
            continue
        chosen = rec["messages"][turn]
        calls = [json.loads(json.dumps(c)) for c in chosen["tool_calls"]]
        k = rng.randrange(len(calls))
        fn = calls[k]["function"]
        args = json.loads(fn["arguments"])
        if rng.random() < 0.5 or not args:  # the wrong tool, with the same arguments
            fn["name"] = rng.choice([t for t in TOOL_NAMES if t != fn["name"]])
        else:  # the right tool, one wrong argument value
            key = rng.choice(sorted(args))
            others = [v for v in pool.get((fn["name"], key), []) if v != args[key]]
            if others:
                args[key] = rng.choice(others)
            elif isinstance(args[key], (int, float)) and not isinstance(args[key], bool):
                args[key] = args[key] + rng.randint(1, 9)
            else:
                fn["name"] = rng.choice([t for t in TOOL_NAMES if t != fn["name"]])
            fn["arguments"] = dumps(args)
        out.append({"messages": rec["messages"][:turn], "tools": rec["tools"], "chosen": chosen,
                    "rejected": {"role": "assistant", "tool_calls": calls}})
    return out


def token_counter(tok):
    """Tokens of a pretraining document (BOS + text + EOS) in Tekken, as the demo model reads it."""
    tekken = tok.instruct_tokenizer.tokenizer
    return lambda text: len(tekken.encode(text, bos=True, eos=True))


def build(tok=None, verbose: bool = False) -> dict[str, bytes]:
    """All output files as {file name: bytes}; validates every conversation with mistral-common."""
    tok = tok or load_mistral_tokenizer()
    count_tokens = token_counter(tok)
    p_train = gen_pretrain(SEEDS["pretrain_train"], COUNTS["pretrain_train"], count_tokens)
    p_eval = gen_pretrain(SEEDS["pretrain_eval"], COUNTS["pretrain_eval"], count_tokens,
                          exclude={r["text"] for r in p_train})
    t_train, l_train = gen_tools(SEEDS["tools_train"], COUNTS["tools_train"], tok)
    t_eval, l_eval = gen_tools(SEEDS["tools_eval"], COUNTS["tools_eval"], tok, exclude={dumps(r) for r in t_train})
    files = {"pretrain_train.jsonl": _jsonl(p_train), "pretrain_eval.jsonl": _jsonl(p_eval),
             "tools_train.jsonl": _jsonl(t_train), "tools_eval.jsonl": _jsonl(t_eval)}
    pool = _arg_pool(t_train + t_eval)
    files["prefs_train.jsonl"] = _jsonl(gen_pairs(SEEDS["prefs_train"], t_train, pool)[:PREF_TRAIN_PAIRS])
    files["prefs_eval.jsonl"] = _jsonl(gen_pairs(SEEDS["prefs_eval"], t_eval, pool))
    if verbose:
        for name, recs in (("pretrain_train", p_train), ("pretrain_eval", p_eval)):
            print(_stats(name, [count_tokens(r["text"]) for r in recs]) + f"  {len(files[name + '.jsonl'])} bytes")
        for name, lens in (("tools_train", l_train), ("tools_eval", l_eval)):
            in_band = sum(80 <= x <= 220 for x in lens) / len(lens)
            print(_stats(name, lens) + f"  80-220: {in_band:.0%}  {len(files[name + '.jsonl'])} bytes")
        print(_tools_mix(t_train + t_eval))
    return files



# --------------------------------------------------------------------------------------------------------------
# The demo base's pretraining corpus (`make demo-base`; not committed: 17 MB, rebuilt in about a second)
# --------------------------------------------------------------------------------------------------------------

BASE_SEEDS = {"docs": 1001, "copy": 21, "shuffle": 5}  # docs: pretrain_train's seed, so its 3000 come first
BASE_COUNTS = {"docs": 12000, "random_value_logs": 30000, "copy_drills": 6000}
# The corpus data/demo/base/ was trained on: a change to the generator that alters it needs a rebuilt base.
BASE_CORPUS_SHA256 = "0b6493d1a346cd89522cf40b897966da068184e38ba2c960ad5442b0961775bd"
COPY_KEYS = {"city", "title", "text", "origin", "destination"}  # free-text arguments the request spells out


def _word_pool() -> list[str]:
    words = set()
    for row in CITIES + PHRASES:
        words.update(w for v in row.values() for w in v.split())
    for titles in EVENT_TITLES.values():
        words.update(w for v in titles for w in v.split())
    return sorted(words)


def _random_value_log(rng, lang, words) -> str:
    """A tool log whose free-text values are random words of all 11 languages: nothing but reading the request
    predicts them, so the base learns to copy arguments out of it (it does not with the tables' 25 cities).

    Known quirk, kept so that data/demo/base/ stays the model this corpus rebuilds: a parallel translation's
    second call keeps the table phrase while its request names the random one, and now and then a value's
    replacement lands inside an earlier replacement; 5.0 % of the free-text values are not in their request."""
    ex = (rng.choice(PARALLEL) if rng.random() < 0.15 else SINGLE[rng.choice(TOOL_NAMES)])(rng, lang)
    user, answer, calls = ex.user, ex.answer, []
    for name, args, _ in ex.calls:
        args = dict(args)
        for k in args:
            if k in COPY_KEYS and isinstance(args[k], str) and args[k] in user:
                old, new = args[k], " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
                user, answer = user.replace(old, new), answer.replace(old, new)
                for c in calls:
                    for kk, vv in c["arguments"].items():
                        if vv == old:
                            c["arguments"][kk] = new
                args[k] = new
        calls.append({"name": name, "arguments": args})
    return "\n".join([user, dumps(calls), answer])


def _copy_drill(rng, words) -> str:
    """Spans of random words or numbers, then the same spans shuffled, then repeated in order: induction."""
    spans = []
    for _ in range(rng.randint(1, 4)):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
        if rng.random() < 0.4:
            s = " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(1, 4)))
        spans.append(s)
    a = " | ".join(spans)
    return a + "\n" + " | ".join(rng.sample(spans, len(spans))) + "\n" + a


def build_base_corpus(tok=None) -> bytes:
    """base_train.jsonl: the demo base's corpus. The documents of pretrain_train (drawn on to 12000, its first
    3000 twice), 30000 tool logs with random argument values (1-2 exchanges each) and 6000 copy drills,
    shuffled. The 400-step pretraining of `make demo` (its 3000 documents) never copied an argument; this
    corpus over 8000 steps does (see configs/demo_base.yaml)."""
    count_tokens = token_counter(tok or load_mistral_tokenizer())
    words = _word_pool()
    docs = gen_pretrain(BASE_SEEDS["docs"], BASE_COUNTS["docs"], count_tokens)
    rng = random.Random(BASE_SEEDS["copy"])
    extra = []
    for _ in range(BASE_COUNTS["random_value_logs"]):
        lang = rng.choice(LANGS)
        extra.append("\n".join(_random_value_log(rng, lang, words) for _ in range(rng.randint(1, 2))))
    extra += [_copy_drill(rng, words) for _ in range(BASE_COUNTS["copy_drills"])]
    rng.shuffle(extra)
    lines = [dumps(r) + "\n" for r in docs + docs[:COUNTS["pretrain_train"]]]
    lines += [dumps({"text": t}) + "\n" for t in extra]
    random.Random(BASE_SEEDS["shuffle"]).shuffle(lines)
    return "".join(lines).encode("utf-8")


def _stats(name, lens):
    s = sorted(lens)

    def q(p):
        return s[min(len(s) - 1, int(p * len(s)))]

    return (f"{name:15s} n={len(s):5d} tokens: min {s[0]} p10 {q(.1)} median {q(.5)} mean {sum(s) / len(s):.1f} "
            f"p90 {q(.9)} max {s[-1]} total {sum(s)}")


def _tools_mix(recs):
    n_sys = sum(r["messages"][0]["role"] == "system" for r in recs)
    n_par = sum(any(len(m.get("tool_calls", [])) == 2 for m in r["messages"]) for r in recs)
    n_chat = sum(not any("tool_calls" in m for m in r["messages"]) for r in recs)
    n_multi = sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in recs)
    return (f"conversations: {len(recs)}  with system prompt {n_sys}  parallel calls {n_par}  "
            f"no tool call {n_chat}  multi-turn {n_multi}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: data/demo)")
    ap.add_argument("--check", action="store_true", help="verify the files in --out equal a fresh generation")
    ap.add_argument("--base-corpus", type=Path, metavar="FILE",
                    help="write only the demo base's pretraining corpus (`make demo-base`) to FILE")
    args = ap.parse_args(argv)
    if args.base_corpus:
        data = build_base_corpus()
        args.base_corpus.parent.mkdir(parents=True, exist_ok=True)
        args.base_corpus.write_bytes(data)
        n_docs = data.count(b"\n")
        print(f"wrote {args.base_corpus} ({n_docs} documents, {len(data) / 1e6:.1f} MB)")
        return 0

    t0 = time.perf_counter()
    files = build(verbose=True)
    elapsed = time.perf_counter() - t0
    if args.check:
        bad = [name for name, data in files.items()
               if not (args.out / name).is_file() or (args.out / name).read_bytes() != data]
        if bad:
            print(f"make_demo_data --check: {', '.join(bad)} in {args.out} differ from a fresh generation; "
                  f"run: python scripts/make_demo_data.py", file=sys.stderr)
            return 1
        print(f"make_demo_data --check: {len(files)} files in {args.out} are up to date ({elapsed:.1f} s)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} files ({total / 1e6:.2f} MB) to {args.out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
