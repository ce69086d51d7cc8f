#!/usr/bin/env python3
"""Generates shared/data/catalog.toml, the demo store's catalog.

Deterministic (fixed seed): re-running it produces the same file. Only the TOML is read by the
code (`shared::catalog::DEMO_CATALOG`); this script exists so the data can be regenerated or
extended. Run from the repository root:  python3 shared/data/gen_catalog.py
"""

import os
import random

rng = random.Random(20240101)

CATEGORIES = [
    ("cameras", "Cameras", ["lenses", "memory-cards", "tripods", "camera-bags"]),
    ("lenses", "Lenses", ["camera-bags", "tripods"]),
    ("memory-cards", "Memory Cards", []),
    ("tripods", "Tripods & Stabilizers", ["camera-bags"]),
    ("camera-bags", "Camera Bags & Kits", []),
    ("laptops", "Laptops", ["laptop-sleeves", "chargers", "peripherals", "monitors"]),
    ("laptop-sleeves", "Laptop Sleeves & Bags", []),
    ("monitors", "Monitors", ["peripherals"]),
    ("peripherals", "Keyboards & Mice", []),
    ("headphones", "Headphones", ["chargers"]),
    ("phones", "Phones", ["phone-cases", "chargers", "headphones"]),
    ("phone-cases", "Phone Cases", []),
    ("chargers", "Chargers & Cables", []),
    ("smart-home", "Smart Home", ["chargers"]),
]

items = []  # dicts


def pop():
    # Skewed: most items are middling, a few are hits.
    return round(min(0.99, max(0.01, rng.betavariate(2.0, 3.5))), 2)


def add(sku, name, category, price, tags, popularity=None, accessories=(), in_stock=None):
    p = pop() if popularity is None else popularity
    t = list(tags)
    if p >= 0.75 and "bestseller" not in t:
        t.append("bestseller")
    if rng.random() < 0.10:
        t.append("new-arrival")
    elif rng.random() < 0.06:
        t.append("clearance")
    if in_stock is None:
        in_stock = rng.random() > 0.05
    items.append(
        dict(
            sku=sku,
            name=name,
            category=category,
            price=price,
            tags=t,
            popularity=p,
            accessories=list(accessories),
            in_stock=in_stock,
        )
    )


def price(lo, hi, ending=0.99):
    return round(rng.randint(lo, hi) + ending, 2)


# --- camera system ------------------------------------------------------------------------------
MOUNTS = {"Lumix": "l-mount", "Orion": "o-mount", "Kestrel": "k-mount", "Valta": "v-mount"}

lenses_by_mount = {m: [] for m in MOUNTS.values()}
n = 1
for brand, mount in MOUNTS.items():
    for focal, kind, lo, hi in [
        ("25mm f/1.7", "prime", 149, 229),
        ("50mm f/1.8", "prime", 179, 279),
        ("85mm f/1.8", "portrait", 349, 549),
        ("12-40mm f/2.8", "zoom", 599, 899),
        ("24-105mm f/4", "zoom", 799, 1099),
        ("70-300mm f/4-5.6", "telephoto", 449, 699),
        ("14mm f/2.8", "wide-angle", 399, 599),
        ("90mm f/2.8 Macro", "macro", 499, 749),
        ("18-55mm f/3.5-5.6", "kit-lens", 129, 199),
    ]:
        sku = f"lens-{n:03d}"
        n += 1
        add(sku, f"{brand} {focal} Lens", "lenses", price(lo, hi), ["camera-accessory", mount, kind])
        lenses_by_mount[mount].append(sku)

CARDS = []
for i, (brand, cap, cls, lo, hi) in enumerate(
    [
        ("SanVault", 32, "uhs-i", 9, 14),
        ("SanVault", 64, "uhs-i", 14, 19),
        ("SanVault", 128, "uhs-i", 22, 29),
        ("SanVault", 256, "uhs-i", 39, 49),
        ("Kingsmark", 64, "uhs-ii", 34, 44),
        ("Kingsmark", 128, "uhs-ii", 59, 79),
        ("Kingsmark", 256, "uhs-ii", 99, 129),
        ("ProGrade X", 128, "cfexpress", 149, 199),
        ("ProGrade X", 256, "cfexpress", 249, 329),
        ("Lexel", 32, "microsd", 7, 11),
        ("Lexel", 64, "microsd", 11, 15),
        ("Lexel", 128, "microsd", 17, 24),
        ("Lexel", 256, "microsd", 29, 39),
        ("Lexel", 512, "microsd", 49, 69),
        ("SanVault", 512, "uhs-i", 69, 89),
        ("Kingsmark", 32, "uhs-ii", 24, 29),
        ("ProGrade X", 512, "cfexpress", 449, 549),
        ("Lexel", 1024, "microsd", 99, 129),
        ("SanVault Extreme", 128, "uhs-i", 29, 36),
        ("SanVault Extreme", 256, "uhs-i", 49, 59),
    ]
):
    sku = "sd-128" if (brand, cap, cls) == ("SanVault", 128, "uhs-i") else f"sd-{i + 1:03d}"
    kind = "microSD" if cls == "microsd" else ("CFexpress" if cls == "cfexpress" else "SD")
    tags = ["camera-accessory", cls]
    if cls == "microsd":
        tags.append("mobile-accessory")
    label = {"uhs-i": " (UHS-I)", "uhs-ii": " (UHS-II)"}.get(cls, "")
    add(sku, f"{brand} {cap}GB {kind} Card{label}", "memory-cards", price(lo, hi), tags,
        popularity=0.88 if sku == "sd-128" else None)
    CARDS.append(sku)
SD_CARDS = [c for c in CARDS if items[[i["sku"] for i in items].index(c)]["tags"][1] != "microsd"]

TRIPODS = []
for i, (name, kind, lo, hi) in enumerate(
    [
        ("TravelLite Carbon Tripod", "tripod", 149, 229),
        ("TravelLite Aluminium Tripod", "tripod", 79, 119),
        ("StudioPro Heavy Tripod", "tripod", 249, 349),
        ("FlexiGrip Mini Tripod", "mini-tripod", 19, 34),
        ("FlexiGrip Pro Mini Tripod", "mini-tripod", 39, 54),
        ("SteadyHand 3-Axis Gimbal", "gimbal", 199, 299),
        ("SteadyHand Mini Gimbal", "gimbal", 99, 149),
        ("MonoPod Carbon Monopod", "monopod", 69, 109),
        ("TravelLite Ball Head", "tripod-head", 49, 79),
        ("StudioPro Fluid Video Head", "tripod-head", 129, 189),
        ("Tabletop Tripod with Phone Clamp", "mini-tripod", 14, 24),
        ("SteadyHand Phone Gimbal", "gimbal", 79, 119),
        ("TravelLite Video Tripod", "tripod", 179, 249),
        ("Selfie Stick Tripod", "mini-tripod", 19, 29),
        ("StudioPro Light Stand", "light-stand", 39, 59),
        ("Quick Release Plate Set", "tripod-head", 12, 19),
    ]
):
    sku = f"tri-{i + 1:03d}"
    tags = ["camera-accessory", kind]
    if "Phone" in name or "Selfie" in name:
        tags.append("mobile-accessory")
    add(sku, name, "tripods", price(lo, hi), tags)
    TRIPODS.append(sku)

BAGS = []
for i, (name, kind, lo, hi) in enumerate(
    [
        ("Urban Sling Camera Bag 6L", "sling", 59, 89),
        ("Urban Sling Camera Bag 10L", "sling", 79, 109),
        ("Trekker Camera Backpack 25L", "backpack", 129, 189),
        ("Trekker Camera Backpack 35L", "backpack", 169, 239),
        ("Classic Canvas Shoulder Bag", "shoulder-bag", 69, 99),
        ("Compact Camera Pouch", "pouch", 14, 24),
        ("Lens Pouch Set (3 pack)", "pouch", 19, 29),
        ("Hard Shell Camera Case", "hard-case", 89, 139),
        ("Roller Camera Case", "hard-case", 199, 279),
        ("Camera Rain Cover", "weather", 19, 29),
        ("Leather Camera Strap", "strap", 29, 49),
        ("Quick Sling Strap", "strap", 39, 59),
        ("Lens Cleaning Kit", "cleaning", 9, 19),
        ("Sensor Cleaning Swabs", "cleaning", 14, 24),
        ("Camera Insert for Any Backpack", "insert", 24, 39),
        ("Everyday Messenger Camera Bag", "shoulder-bag", 99, 149),
        ("Waterproof Camera Dry Bag", "weather", 29, 44),
    ]
):
    sku = f"bag-{i + 1:03d}"
    add(sku, name, "camera-bags", price(lo, hi), ["camera-accessory", kind])
    BAGS.append(sku)
add(
    "kit-cam-starter",
    "Camera Starter Kit: Sling Bag, 64GB Card & Cleaning Set",
    "camera-bags",
    79.99,
    ["camera-accessory", "bundle"],
    popularity=0.7,
    in_stock=True,
)

CAMERAS = [
    ("cam-001", "Lumix Z5 Mirrorless Camera", "Lumix", 499.00, ["mirrorless", "4k"], 0.93),
    ("cam-002", "Lumix Z7 Mirrorless Camera", "Lumix", 1299.00, ["mirrorless", "4k", "full-frame"], 0.71),
    ("cam-003", "Lumix G100 Vlogging Camera", "Lumix", 599.00, ["mirrorless", "4k", "vlogging"], 0.66),
    ("cam-004", "Lumix Z9 Pro Body", "Lumix", 2499.00, ["mirrorless", "8k", "full-frame"], 0.38),
    ("cam-005", "Orion A6 Mirrorless Camera", "Orion", 749.00, ["mirrorless", "4k"], 0.81),
    ("cam-006", "Orion A7 IV Full-Frame Camera", "Orion", 1999.00, ["mirrorless", "4k", "full-frame"], 0.74),
    ("cam-007", "Orion ZV Compact Vlog Camera", "Orion", 649.00, ["compact", "4k", "vlogging"], 0.69),
    ("cam-008", "Orion A1 Flagship Body", "Orion", 5499.00, ["mirrorless", "8k", "full-frame"], 0.21),
    ("cam-009", "Kestrel D780 DSLR", "Kestrel", 1599.00, ["dslr", "4k", "full-frame"], 0.44),
    ("cam-010", "Kestrel D3500 Starter DSLR", "Kestrel", 449.00, ["dslr", "beginner"], 0.62),
    ("cam-011", "Kestrel Z50 Mirrorless Camera", "Kestrel", 859.00, ["mirrorless", "4k"], 0.57),
    ("cam-012", "Kestrel Zf Retro Camera", "Kestrel", 1999.00, ["mirrorless", "full-frame", "retro"], 0.49),
    ("cam-013", "Valta X-T5 Mirrorless Camera", "Valta", 1699.00, ["mirrorless", "4k", "retro"], 0.64),
    ("cam-014", "Valta X-S20 Mirrorless Camera", "Valta", 1299.00, ["mirrorless", "4k", "vlogging"], 0.55),
    ("cam-015", "Valta X100 Compact Camera", "Valta", 1599.00, ["compact", "retro"], 0.77),
    ("cam-016", "Valta Instax Mini Instant Camera", "Valta", 79.00, ["instant", "beginner"], 0.72),
    ("cam-017", "ActionPro Hero 12 Action Camera", None, 399.00, ["action", "4k", "waterproof"], 0.79),
    ("cam-018", "ActionPro Hero 11 Mini", None, 249.00, ["action", "4k", "waterproof"], 0.51),
    ("cam-019", "SkyView Mini 4 Drone Camera", None, 759.00, ["drone", "4k"], 0.58),
    ("cam-020", "PocketCam 3 Gimbal Camera", None, 519.00, ["gimbal", "4k", "vlogging"], 0.46),
]
for sku, name, brand, p, tags, popularity in CAMERAS:
    acc = []
    if brand:
        mount = MOUNTS[brand]
        acc += rng.sample(lenses_by_mount[mount][:4], 2) + [lenses_by_mount[mount][-1]]
    if sku == "cam-001":
        acc = ["lens-001", "lens-009", "sd-128", "tri-001", "bag-001", "kit-cam-starter"]
    else:
        acc += [rng.choice(SD_CARDS), rng.choice(TRIPODS[:10]), rng.choice(BAGS[:9])]
    add(sku, name, "cameras", p, tags, popularity=popularity, accessories=acc,
        in_stock=(sku != "cam-008"))

# --- computing ----------------------------------------------------------------------------------
SLEEVES = {13: [], 14: [], 15: [], 16: []}
for i, (name, size, kind, lo, hi) in enumerate(
    [
        ("Felt Laptop Sleeve", 13, "sleeve", 19, 29),
        ("Felt Laptop Sleeve", 14, "sleeve", 19, 29),
        ("Felt Laptop Sleeve", 16, "sleeve", 24, 34),
        ("Neoprene Laptop Sleeve", 13, "sleeve", 14, 22),
        ("Neoprene Laptop Sleeve", 15, "sleeve", 16, 24),
        ("Leather Laptop Folio", 14, "sleeve", 59, 89),
        ("Leather Laptop Folio", 16, "sleeve", 69, 99),
        ("Commuter Laptop Backpack", 15, "backpack", 79, 119),
        ("Commuter Laptop Backpack", 16, "backpack", 89, 129),
        ("Hardshell Laptop Case", 13, "hard-case", 29, 39),
        ("Hardshell Laptop Case", 14, "hard-case", 29, 39),
        ("Hardshell Laptop Case", 15, "hard-case", 34, 44),
        ("Slim Messenger Bag", 14, "messenger", 49, 69),
        ("Slim Messenger Bag", 16, "messenger", 54, 74),
        ("Rolling Laptop Briefcase", 16, "roller", 129, 179),
        ("Water-Resistant Laptop Sleeve", 13, "sleeve", 24, 34),
        ("Water-Resistant Laptop Sleeve", 15, "sleeve", 24, 34),
        ("Kids Laptop Sleeve", 13, "sleeve", 12, 19),
    ]
):
    sku = f"slv-{i + 1:03d}"
    add(sku, f'{name} {size}"', "laptop-sleeves", price(lo, hi), ["laptop-accessory", kind, f"{size}-inch"])
    SLEEVES[size].append(sku)

PERIPHERALS = []
for i, (name, kind, lo, hi) in enumerate(
    [
        ("Keyflow Wireless Keyboard", "keyboard", 49, 79),
        ("Keyflow Mechanical Keyboard", "keyboard", 99, 149),
        ("Keyflow Compact 60% Keyboard", "keyboard", 79, 119),
        ("Keyflow Ergonomic Split Keyboard", "keyboard", 129, 179),
        ("Glide Wireless Mouse", "mouse", 24, 39),
        ("Glide Pro Ergonomic Mouse", "mouse", 79, 109),
        ("Glide Travel Mouse", "mouse", 19, 29),
        ("Glide Gaming Mouse", "mouse", 49, 79),
        ("Precision Trackpad", "mouse", 99, 139),
        ("Vertical Ergonomic Mouse", "mouse", 39, 59),
        ("USB-C 7-in-1 Hub", "hub", 39, 59),
        ("USB-C 12-in-1 Docking Station", "hub", 149, 229),
        ("Thunderbolt 4 Dock", "hub", 249, 329),
        ("Full HD Webcam", "webcam", 49, 79),
        ("4K Streaming Webcam", "webcam", 129, 179),
        ("Desk Microphone USB", "microphone", 79, 129),
        ("Laptop Stand Aluminium", "stand", 29, 49),
        ("Adjustable Laptop Riser", "stand", 39, 59),
        ("Large Desk Mat", "desk", 19, 29),
        ("Wrist Rest Set", "desk", 14, 24),
        ("Numeric Keypad Wireless", "keyboard", 19, 29),
        ("Presentation Clicker", "mouse", 24, 34),
        ("External SSD 1TB", "storage", 89, 129),
        ("External SSD 2TB", "storage", 149, 199),
        ("USB-C Flash Drive 256GB", "storage", 24, 39),
        ("Privacy Screen Filter 14\"", "desk", 29, 44),
    ]
):
    sku = f"per-{i + 1:03d}"
    add(sku, name, "peripherals", price(lo, hi), ["laptop-accessory", kind])
    PERIPHERALS.append(sku)

MONITORS = []
for i, (name, kind, lo, hi) in enumerate(
    [
        ('ViewEdge 24" Full HD Monitor', "1080p", 129, 179),
        ('ViewEdge 27" QHD Monitor', "1440p", 229, 299),
        ('ViewEdge 27" 4K Monitor', "4k", 349, 449),
        ('ViewEdge 32" 4K Monitor', "4k", 449, 599),
        ('ViewEdge 34" Ultrawide Monitor', "ultrawide", 499, 699),
        ('PixelPro 27" 5K Studio Display', "5k", 1299, 1599),
        ('PixelPro 32" 6K Reference Display', "6k", 2999, 3999),
        ('GameRush 27" 165Hz Monitor', "gaming", 279, 379),
        ('GameRush 32" 240Hz OLED', "gaming", 899, 1199),
        ('PortaView 15.6" Portable Monitor', "portable", 149, 219),
        ('PortaView 13.3" Portable Touch Monitor', "portable", 199, 259),
        ("Dual Monitor Arm", "mount", 79, 119),
        ("Single Monitor Arm", "mount", 49, 79),
        ('ViewEdge 24" USB-C Monitor', "usb-c", 199, 259),
        ('ViewEdge 27" USB-C Hub Monitor', "usb-c", 329, 429),
        ("Monitor Light Bar", "desk", 39, 59),
    ]
):
    sku = f"mon-{i + 1:03d}"
    add(sku, name, "monitors", price(lo, hi), [kind], accessories=rng.sample(PERIPHERALS[:12], 2))
    MONITORS.append(sku)

CHARGERS = []
for i, (name, kind, lo, hi, tags) in enumerate(
    [
        ("VoltCube 20W USB-C Charger", "charger", 15, 22, ["usb-c", "mobile-accessory"]),
        ("VoltCube 30W USB-C Charger", "charger", 22, 29, ["usb-c", "mobile-accessory", "fast-charging"]),
        ("VoltCube 65W GaN Charger", "charger", 39, 55, ["usb-c", "laptop-accessory", "fast-charging"]),
        ("VoltCube 100W GaN 3-Port Charger", "charger", 59, 79, ["usb-c", "laptop-accessory", "fast-charging"]),
        ("VoltCube 140W Laptop Charger", "charger", 89, 109, ["usb-c", "laptop-accessory"]),
        ("Braided USB-C to USB-C Cable 1m", "cable", 9, 14, ["usb-c", "mobile-accessory"]),
        ("Braided USB-C to USB-C Cable 2m", "cable", 12, 17, ["usb-c", "mobile-accessory"]),
        ("Braided USB-C to Lightning Cable", "cable", 14, 19, ["mobile-accessory"]),
        ("240W USB-C Charging Cable", "cable", 19, 27, ["usb-c", "laptop-accessory"]),
        ("MagCharge 15W Wireless Pad", "wireless", 29, 39, ["wireless-charging", "mobile-accessory"]),
        ("MagCharge 3-in-1 Wireless Stand", "wireless", 79, 119, ["wireless-charging", "mobile-accessory"]),
        ("MagCharge Car Mount Charger", "car", 39, 59, ["wireless-charging", "mobile-accessory"]),
        ("PowerPack 10000mAh Power Bank", "power-bank", 24, 34, ["mobile-accessory"]),
        ("PowerPack 20000mAh Power Bank", "power-bank", 39, 54, ["mobile-accessory", "fast-charging"]),
        ("PowerPack 27000mAh Laptop Power Bank", "power-bank", 99, 139, ["laptop-accessory"]),
        ("Dual USB-C Car Charger", "car", 14, 24, ["usb-c", "mobile-accessory"]),
        ("Travel Adapter with USB-C", "travel", 24, 39, ["usb-c", "mobile-accessory"]),
        ("6-Outlet Surge Protector with USB", "power-strip", 24, 39, []),
        ("Camera Battery Dual Charger", "camera-power", 29, 44, ["camera-accessory"]),
        ("Spare Camera Battery", "camera-power", 39, 59, ["camera-accessory"]),
        ("Earbud Charging Case Cable Kit", "cable", 9, 14, ["mobile-accessory"]),
        ("Smart Plug Power Adapter 2-Pack", "power-strip", 19, 29, ["smart-home-compatible"]),
        ("Magnetic Charging Cable for Watches", "cable", 14, 24, ["mobile-accessory"]),
        ("Solar Power Bank 10000mAh", "power-bank", 34, 49, ["mobile-accessory", "outdoor"]),
    ]
):
    sku = f"chg-{i + 1:03d}"
    add(sku, name, "chargers", price(lo, hi), [kind] + tags)
    CHARGERS.append(sku)
LAPTOP_CHARGERS = [c for c, it in zip(CHARGERS, items[-len(CHARGERS):]) if "laptop-accessory" in it["tags"]]
PHONE_CHARGERS = [c for c, it in zip(CHARGERS, items[-len(CHARGERS):]) if "mobile-accessory" in it["tags"]]

LAPTOPS = [
    ("Aero 13 Ultrabook", 13, 999, ["ultrabook", "lightweight"]),
    ("Aero 14 Pro", 14, 1499, ["ultrabook", "creator"]),
    ("Aero 16 Creator", 16, 2299, ["creator", "oled"]),
    ("Nimbus Air 13", 13, 1099, ["ultrabook", "lightweight"]),
    ("Nimbus Pro 14", 14, 1999, ["creator", "pro"]),
    ("Nimbus Pro 16", 16, 2499, ["creator", "pro"]),
    ("Titan G15 Gaming Laptop", 15, 1399, ["gaming"]),
    ("Titan G16 Gaming Laptop", 16, 1899, ["gaming", "oled"]),
    ("Titan G14 Compact Gaming", 14, 1599, ["gaming"]),
    ("Slate 13 2-in-1", 13, 899, ["convertible", "touchscreen"]),
    ("Slate 14 2-in-1", 14, 1099, ["convertible", "touchscreen"]),
    ("Workmate 14 Business", 14, 1199, ["business"]),
    ("Workmate 15 Business", 15, 1299, ["business"]),
    ("Workmate 13 Carbon", 13, 1699, ["business", "lightweight"]),
    ("Studio 15 Budget Laptop", 15, 549, ["budget"]),
    ("Studio 14 Budget Laptop", 14, 479, ["budget"]),
    ("Chromeleaf 14 Chromebook", 14, 329, ["chromebook", "budget"]),
    ("Chromeleaf 13 Flip", 13, 429, ["chromebook", "convertible"]),
    ("Aero 15 Student Edition", 15, 749, ["student", "budget"]),
    ("Nimbus Air 15", 15, 1299, ["ultrabook"]),
    ("Titan G17 Desktop Replacement", 16, 2799, ["gaming", "pro"]),
    ("Slate 13 Detachable", 13, 999, ["convertible", "touchscreen", "lightweight"]),
    ("Workmate 16 Workstation", 16, 2999, ["workstation", "pro"]),
    ("Aero 14 OLED", 14, 1199, ["oled", "ultrabook"]),
]
for i, (name, size, p, tags) in enumerate(LAPTOPS):
    sku = f"lap-{i + 1:03d}"
    sleeve_pool = SLEEVES.get(size) or SLEEVES[15]
    acc = rng.sample(sleeve_pool, min(2, len(sleeve_pool)))
    acc += [rng.choice(LAPTOP_CHARGERS), rng.choice(PERIPHERALS[:12])]
    add(sku, f'{name} {size}"', "laptops", float(p) - 0.01, tags + [f"{size}-inch"], accessories=acc)

# --- phones -------------------------------------------------------------------------------------
PHONES = [
    ("Pixelon 9", 799), ("Pixelon 9 Pro", 999), ("Pixelon 9a", 499), ("Pixelon Fold", 1799),
    ("Galaxis S25", 899), ("Galaxis S25 Ultra", 1299), ("Galaxis A56", 449), ("Galaxis Z Flip", 1099),
    ("iFruit 16", 829), ("iFruit 16 Pro", 1099), ("iFruit 16 Pro Max", 1199), ("iFruit SE", 429),
    ("Nordic One 3", 599), ("Nordic One 3 Lite", 349), ("Motiva Edge", 649), ("Motiva G Power", 249),
    ("Xenon 14T", 699), ("Xenon Redmi 14", 229), ("Fairtone 5 Repairable Phone", 699), ("RuggedX 3 Outdoor Phone", 549),
]
phone_skus = []
for i, (name, p) in enumerate(PHONES):
    phone_skus.append((f"ph-{i + 1:03d}", name, p))

CASES = {}
case_idx = 1
for sku, name, _ in phone_skus[:15]:
    for kind, label, lo, hi in [("clear", "Clear Case", 14, 24), ("rugged", "Rugged Armor Case", 29, 44)]:
        csku = f"case-{case_idx:03d}"
        case_idx += 1
        add(csku, f"{label} for {name}", "phone-cases", price(lo, hi), ["mobile-accessory", kind])
        CASES.setdefault(sku, []).append(csku)

HEADPHONES = []
for i, (name, kind, lo, hi, tags) in enumerate(
    [
        ("Sonora QC Ultra Headphones", "over-ear", 379, 429, ["noise-cancelling", "wireless"]),
        ("Sonora QC Earbuds II", "earbuds", 249, 299, ["noise-cancelling", "wireless"]),
        ("Sonora Sport Earbuds", "earbuds", 149, 179, ["wireless", "sport"]),
        ("Auralis WH-1000 Headphones", "over-ear", 349, 399, ["noise-cancelling", "wireless"]),
        ("Auralis WF Earbuds", "earbuds", 229, 279, ["noise-cancelling", "wireless"]),
        ("Auralis CH-520 Headphones", "on-ear", 49, 69, ["wireless", "budget"]),
        ("Pods Pro 2", "earbuds", 229, 249, ["noise-cancelling", "wireless"]),
        ("Pods 4", "earbuds", 129, 179, ["wireless"]),
        ("Pods Max", "over-ear", 499, 549, ["noise-cancelling", "wireless"]),
        ("BassLine Studio Monitor Headphones", "over-ear", 99, 149, ["wired", "studio"]),
        ("BassLine DJ Headphones", "over-ear", 129, 179, ["wired", "studio"]),
        ("BassLine Open-Back Reference", "over-ear", 299, 399, ["wired", "studio"]),
        ("Jogger Bone Conduction Headphones", "open-ear", 99, 149, ["wireless", "sport"]),
        ("Jogger Neckband Earphones", "earbuds", 29, 49, ["wireless", "sport", "budget"]),
        ("KidSafe Volume-Limited Headphones", "on-ear", 24, 34, ["kids", "wired"]),
        ("GameRush Wireless Gaming Headset", "gaming-headset", 129, 179, ["wireless", "gaming"]),
        ("GameRush Wired Gaming Headset", "gaming-headset", 49, 79, ["wired", "gaming"]),
        ("Budget Wired Earphones", "earbuds", 9, 14, ["wired", "budget"]),
        ("USB-C Earphones", "earbuds", 14, 24, ["wired", "usb-c"]),
        ("Sonora Home Speaker Headphones Bundle", "over-ear", 449, 499, ["wireless", "bundle"]),
        ("Auralis Sleep Buds", "earbuds", 199, 249, ["wireless", "sleep"]),
        ("Pods Case Replacement", "earbuds", 69, 89, ["wireless"]),
        ("Sonora Travel Headphones", "over-ear", 199, 249, ["noise-cancelling", "wireless", "travel"]),
        ("Auralis Swim Waterproof Earbuds", "earbuds", 129, 159, ["waterproof", "sport"]),
        ("Vintage Wood Headphones", "on-ear", 149, 199, ["wired"]),
        ("Headphone Stand & USB Hub", "stand", 29, 44, []),
    ]
):
    sku = f"hp-{i + 1:03d}"
    acc = [rng.choice(PHONE_CHARGERS)] if "wireless" in tags else []
    add(sku, name, "headphones", price(lo, hi), [kind] + tags, accessories=acc)
    HEADPHONES.append(sku)

for sku, name, p in phone_skus:
    acc = list(CASES.get(sku, []))
    acc += rng.sample(PHONE_CHARGERS[:10], 2) + [rng.choice(HEADPHONES[:9])]
    tags = ["5g", "smartphone"]
    if p >= 900:
        tags.append("flagship")
    elif p < 400:
        tags.append("budget")
    add(sku, name, "phones", float(p) - 0.01, tags, accessories=acc)

# --- smart home ---------------------------------------------------------------------------------
for i, (name, kind, lo, hi) in enumerate(
    [
        ("HomeHub Smart Speaker", "speaker", 49, 99),
        ("HomeHub Max Smart Display", "display", 179, 229),
        ("HomeHub Mini Speaker", "speaker", 29, 49),
        ("Lumo Smart Bulb E27 (4 pack)", "lighting", 39, 59),
        ("Lumo Smart Light Strip 5m", "lighting", 29, 49),
        ("Lumo Smart Bulb Starter Kit", "lighting", 79, 99),
        ("SafeNest Video Doorbell", "security", 99, 179),
        ("SafeNest Indoor Camera", "security", 39, 69),
        ("SafeNest Outdoor Camera", "security", 99, 149),
        ("SafeNest Smart Lock", "security", 199, 279),
        ("ThermoSense Smart Thermostat", "climate", 129, 249),
        ("ThermoSense Room Sensor (2 pack)", "climate", 39, 59),
        ("AirPure Smart Air Purifier", "climate", 149, 249),
        ("Plugit Smart Plug (4 pack)", "power", 29, 44),
        ("Plugit Smart Power Strip", "power", 39, 59),
        ("RoboClean S8 Robot Vacuum", "cleaning", 399, 599),
        ("RoboClean Mini Robot Vacuum", "cleaning", 199, 279),
        ("HomeHub Mesh Wi-Fi (3 pack)", "networking", 199, 299),
        ("HomeHub Mesh Wi-Fi (2 pack)", "networking", 149, 199),
        ("Leak Sensor Kit", "security", 29, 49),
        ("Smart Smoke Alarm", "security", 59, 89),
        ("Smart Garden Sprinkler Controller", "outdoor", 99, 149),
        ("Smart Blinds Motor", "climate", 99, 149),
        ("Zigbee Bridge", "networking", 39, 59),
        ("Smart Kitchen Scale", "kitchen", 29, 49),
        ("Smart Pet Feeder", "pets", 79, 119),
    ]
):
    add(f"home-{i + 1:03d}", name, "smart-home", price(lo, hi), [kind, "smart-home-compatible"])


# --- write --------------------------------------------------------------------------------------
def q(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def arr(xs):
    return "[" + ", ".join(q(x) for x in xs) + "]"


out = [
    "# Edgewise demo store catalog. Generated by shared/data/gen_catalog.py (deterministic);",
    "# edit the script and re-run it rather than editing this file by hand.",
    "version = 1",
    "",
]
for cid, name, acc in CATEGORIES:
    out.append("[[category]]")
    out.append(f"id = {q(cid)}")
    out.append(f"name = {q(name)}")
    if acc:
        out.append(f"accessory_categories = {arr(acc)}")
    out.append("")
order = {c[0]: i for i, c in enumerate(CATEGORIES)}
items.sort(key=lambda it: (order[it["category"]], it["sku"]))
for it in items:
    out.append("[[item]]")
    out.append(f"sku = {q(it['sku'])}")
    out.append(f"name = {q(it['name'])}")
    out.append(f"category = {q(it['category'])}")
    out.append(f"price = {it['price']:.2f}")
    if it["tags"]:
        out.append(f"tags = {arr(it['tags'])}")
    out.append(f"popularity = {it['popularity']:.2f}")
    if not it["in_stock"]:
        out.append("in_stock = false")
    if it["accessories"]:
        out.append(f"accessories = {arr(it['accessories'])}")
    out.append(f"image = {q('/img/' + it['sku'] + '.jpg')}")
    out.append("")

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalog.toml")
with open(path, "w") as f:
    f.write("\n".join(out))
print(f"wrote {len(items)} items in {len(CATEGORIES)} categories to {path}")
