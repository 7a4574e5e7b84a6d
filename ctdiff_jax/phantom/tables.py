"""Label and tissue vocabularies of the phantom, shared by the painters and the cohort writer.

Label ids are what `<case>_seg.nii.gz` holds (written to labels.json); tissue ids are the finer
classes the intensity model paints (a kidney is cortex, medulla and sinus fat), with the mean
HU each case draws its own value around. Kept apart from cohort.py so that canvas.py and
anatomy.py can use them without an import circle; cohort.py re-exports the public names.
"""

from __future__ import annotations

# Label ids: TotalSegmentator ("total" task, v2) ids for the organs it shares, so the phantom
# and real data can be mixed; tumours get ids above TotalSegmentator's range.
LIVER_TUMOR = 201
KIDNEY_TUMOR = 200
VERTEBRA_L1 = 31  # TotalSegmentator numbers vertebrae upwards from S1 (26): L5=27 .. T7=37.
_VERTEBRA_NAMES = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")
LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    18: "small_bowel",
    **{27 + i: f"vertebrae_{n}" for i, n in enumerate(_VERTEBRA_NAMES)},
    51: "heart",
    52: "aorta",
    63: "inferior_vena_cava",
    79: "spinal_cord",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    KIDNEY_TUMOR: "kidney_tumor",
    LIVER_TUMOR: "liver_tumor",
}
LABEL_IDS = {name: i for i, name in LABELS.items()}  # name -> id
ID = LABEL_IDS

# Tissue classes: what the intensity model paints (finer than labels: a kidney is cortex,
# medulla and sinus fat). Returned by `generate_case(..., return_tissues=True)` for checks.
TISSUES = (
    "air", "subcutaneous_fat", "visceral_fat", "muscle", "cortical_bone", "cancellous_bone",
    "disc", "spinal_cord", "lung", "lung_vessel", "liver", "spleen", "kidney_cortex",
    "kidney_medulla", "renal_sinus_fat", "aorta", "ivc", "heart", "stomach_wall", "fluid", "gas",
    "bowel", "gallbladder", "liver_lesion", "kidney_lesion", "rib", "table",
)
TISSUE_IDS = {name: i for i, name in enumerate(TISSUES)}
T = TISSUE_IDS

# Mean HU per tissue and the +- range a case draws its own value from (contrast timing,
# scanner calibration): a late-arterial / corticomedullary phase abdomen.
TISSUE_HU = {
    "air": (-1000, 0), "subcutaneous_fat": (-100, 8), "visceral_fat": (-92, 8),
    "muscle": (50, 6), "cortical_bone": (700, 80), "cancellous_bone": (250, 40),
    "disc": (85, 10), "spinal_cord": (30, 5), "lung": (-855, 25), "lung_vessel": (40, 10),
    "liver": (60, 6), "spleen": (50, 6), "kidney_cortex": (150, 25), "kidney_medulla": (40, 8),
    "renal_sinus_fat": (-80, 10), "aorta": (260, 50), "ivc": (90, 20), "heart": (120, 25),
    "stomach_wall": (45, 8), "fluid": (10, 5), "gas": (-950, 20), "bowel": (35, 8),
    "gallbladder": (8, 5), "liver_lesion": (30, 0), "kidney_lesion": (30, 0), "rib": (350, 50),
    "table": (150, 30),
}
# Tissues that get a faint smooth texture (parenchyma is never perfectly flat on CT).
TEXTURED = ("liver", "spleen", "kidney_cortex", "kidney_medulla", "muscle", "heart", "bowel",
            "stomach_wall", "liver_lesion", "kidney_lesion")

# MR mode (`--modality=mr`): relative T1-weighted signal per tissue (fat = 1; no HU) and the
# +- range a case draws its own value from. Fat and fatty marrow bright, fluid, bile, flowing
# blood, cortical bone, lung and air dark, liver > kidney cortex > spleen / muscle between,
# tumours hypointense to their host.
TISSUE_T1 = {
    "air": (0.0, 0.0), "subcutaneous_fat": (1.0, 0.03), "visceral_fat": (0.95, 0.03),
    "muscle": (0.30, 0.03), "cortical_bone": (0.03, 0.01), "cancellous_bone": (0.65, 0.05),
    "disc": (0.25, 0.03), "spinal_cord": (0.40, 0.03), "lung": (0.03, 0.01),
    "lung_vessel": (0.05, 0.01), "liver": (0.55, 0.03), "spleen": (0.38, 0.03),
    "kidney_cortex": (0.45, 0.03), "kidney_medulla": (0.32, 0.03),
    "renal_sinus_fat": (0.90, 0.03), "aorta": (0.06, 0.02), "ivc": (0.10, 0.03),
    "heart": (0.30, 0.03), "stomach_wall": (0.33, 0.03), "fluid": (0.08, 0.02),
    "gas": (0.0, 0.0), "bowel": (0.35, 0.03), "gallbladder": (0.10, 0.02),
    "liver_lesion": (0.25, 0.03), "kidney_lesion": (0.22, 0.03), "rib": (0.55, 0.05),
    "table": (0.0, 0.0),
}
