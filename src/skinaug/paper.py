"""The paper's reported numbers, in one place: what the demo world draws, the report sets ours
beside, and the speed benchmark's study estimate multiplies (SPEC §1-6).
"""

# Images per label and fitzpatrick_scale in the study subset: paper Table 1, counted
# once from fitzpatrick17k.csv (md5 75556ecbd0bd6227050112565c24b991). The demo world
# draws exactly these; the real CSV is never read here.
TABLE1_COUNTS = {
    "basal cell carcinoma": {1: 85, 2: 156, 5: 24, 6: 7},
    "folliculitis": {1: 30, 2: 97, 5: 31, 6: 9},
    "nematode infection": {1: 15, 2: 56, 5: 32, 6: 12},
    "neutrophilic dermatoses": {1: 70, 2: 115, 5: 31, 6: 15},
    "prurigo nodularis": {1: 7, 2: 28, 5: 29, 6: 9},
    "psoriasis": {1: 113, 2: 232, 5: 64, 6: 21},
    "squamous cell carcinoma": {1: 100, 2: 180, 5: 40, 6: 23},
}
# Training -> test images per scenario on the full 1,631 rows of Table 1 (SPEC §2).
SPLIT_SIZES = {1: (1519, 56), 2: (1284, 291), 3: (1228, 291)}
TABLES = {1: "Table 2", 2: "Table 3", 3: "Table 4"}  # where each scenario's accuracy is reported
# Accuracy, mean over 5 repeats (SPEC §5): real, syn, real+syn.
ACCURACY = {
    1: {"vgg16": (70.24, 75.00, 77.98), "resnet18": (68.45, 69.05, 71.36), "vit_b_16": (70.38, 74.19, 78.65)},
    2: {"vgg16": (58.79, 62.86, 63.66), "resnet18": (50.31, 56.36, 61.33), "vit_b_16": (62.03, 68.83, 71.20)},
    3: {"vgg16": (55.58, 57.62, 58.08), "resnet18": (49.42, 53.47, 56.50), "vit_b_16": (57.66, 58.94, 60.96)},
}
# Table 5 (SPEC §6): accuracy on the light / dark flexible 56, VGG-16 trained on syn only.
ABLATION = {"txt2img_vanilla": (18.80, 21.22), "txt2img_ti": (35.36, 44.64), "img2img_vanilla": (48.21, 69.64),
           "img2img_ti": (46.43, 71.43), "img2img_lora": (52.00, 73.21), "img2img_ti_lora": (53.57, 79.57)}
