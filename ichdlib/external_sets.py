"""Names of the public external test sets' files and columns (CQ500, PhysioNet CT-ICH), shared by their
readers (:mod:`ichdlib.validate.readers`) and the phantom that writes them (:mod:`ichdlib.phantom.layouts`)
so that neither imports the other (the phantom never loads for real data)."""

from __future__ import annotations

#: CQ500's reads.csv findings per reader, in the file's order.
CQ500_FINDINGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                  "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift")
#: CQ500 finding -> RSNA label.
CQ500_LABELS = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural",
                "EDH": "epidural", "SAH": "subarachnoid"}
CQ500_READS = "reads.csv"
#: CT-ICH slice CSV column -> RSNA label.
CTICH_LABELS = {"Epidural": "epidural", "Intraparenchymal": "intraparenchymal",
                "Intraventricular": "intraventricular", "Subarachnoid": "subarachnoid", "Subdural": "subdural"}
CTICH_CSV = "hemorrhage_diagnosis_raw_ct.csv"
CTICH_COLUMNS = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural",
                 "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
#: CT-ICH folders: HU volumes and hemorrhage masks, ``<NNN>.nii`` each.
CTICH_SCANS, CTICH_MASKS = "ct_scans", "masks"
