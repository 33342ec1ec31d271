"""skullrec viewer: look at a reconstruction and its implant, browse and compare results (the Streamlit page).

A Streamlit script, run by ``skullrec view`` (``streamlit run`` on this file, which passes the folders as
SKULLREC_VIEW_* environment variables) and by ``streamlit run app/viewer.py`` in a checkout; it ships in
the wheel. Imports are absolute because Streamlit executes the file as a script, not as a module.
Layout only: the numerical work is in skullrec.viewer.helpers (helpers), skullrec.inference.predict (reconstruction,
meshes), skullrec.nets.checkpoint (safe loading) and skullrec.evaluation.metrics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from skullrec.errors import InputError
from skullrec.io import Volume
from skullrec.viewer import helpers as V
from skullrec.viewer import launch as L

st.set_page_config(page_title="skullrec viewer", page_icon=":skull:", layout="wide")

try:
    SETTINGS = L.settings_from_env()
except InputError as exc:
    st.error(str(exc))
    st.stop()

PAGES = ["Case", "Compare runs", "Results"]
RUNS_TEXT = " or ".join(f"{r}/" for r in SETTINGS.runs)
FILTER_COLUMNS = V.BOOKKEEPING_COLUMNS
DATA_SOURCE, UPLOAD_SOURCE, INPUT_SOURCE = "Data set", "Upload", "File (--in)"


# ------------------------------------------------------------------------------------------
# cached work (keys are explicit strings; big arrays are passed as _underscored, unhashed args)
# ------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading checkpoint ...", max_entries=4)
def load_model(path: str, mtime_ns: int):
    """The model of a checkpoint, loaded once per file version (safe loader: no pickle)."""
    from skullrec.nets.checkpoint import load_checkpoint

    model, cfg, meta = load_checkpoint(path, device="cpu")
    model.eval()
    return model, cfg, meta


@st.cache_data(show_spinner="Reading case ...", max_entries=8)
def load_case(root: str, split: str, cid: str, _stamp: str) -> V.CaseVolumes:
    return V.load_case(root, split, cid)


@st.cache_data(show_spinner="Reading input ...", max_entries=2)
def read_input(path: str, _stamp: str, ct_bone_hu: float | None, series: tuple[str, ...]) -> Volume:
    return V.read_input(path, ct_bone_hu, series)


@st.cache_data(show_spinner="Reading upload ...", max_entries=4)
def read_upload(name: str, digest: str, _payload: bytes, threshold: float | None, max_mb: int) -> Volume:
    return V.read_upload(name, _payload, threshold=threshold, max_mb=max_mb)


# Few entries: a reconstructed 512^3 upload holds two full-size volumes.
@st.cache_data(show_spinner="Reconstructing ...", max_entries=6)
def reconstruct(input_key: str, ckpt: str, mtime_ns: int, _defective: Volume, stage2: str | None = None,
                stage2_mtime_ns: int = 0) -> tuple[Volume, Volume, list[str], list[str]]:
    """Complete skull, implant, problems and warnings of one input on its own grid, as ``skullrec predict``
    makes them (skullrec.inference.predict.reconstruct, then apply_stage2 with a stage-2 checkpoint)."""
    from skullrec.inference.predict import apply_stage2
    from skullrec.inference.predict import reconstruct as _reconstruct

    model, cfg, _ = load_model(ckpt, mtime_ns)
    rec = _reconstruct(model, [_defective], batch_size=1, device="cpu", size=cfg.model.size)[0]
    if stage2 is not None and rec.usable:
        model2, cfg2, _ = load_stage2_model(stage2, stage2_mtime_ns)
        rec = apply_stage2(rec, _defective, model2, cfg2, "cpu")
    return rec.complete, rec.implant, rec.problems, rec.warnings


@st.cache_resource(show_spinner="Loading stage-2 checkpoint ...", max_entries=2)
def load_stage2_model(path: str, mtime_ns: int):
    """The implant UNet of a stage-2 checkpoint, loaded once per file version (safe loader: no pickle)."""
    from skullrec.nets.checkpoint import load_implant_checkpoint

    return load_implant_checkpoint(path, device="cpu")


@st.cache_data(show_spinner="Meshing ...", max_entries=64)
def surface(key: str, _mask, _affine):
    return V.surface(_mask, _affine)


@st.cache_data(show_spinner="Scoring ...", max_entries=32)
def metric_rows(key: str, _rec: Volume, _implant: Volume, _case: V.CaseVolumes) -> list[dict]:
    rows = V.case_metric_rows(_rec, _case.complete, _case.defective, "skull")
    rows += V.case_metric_rows(_implant, _case.implant, None, "implant")
    return rows


def download_makers(rec: Volume, implant: Volume) -> dict[str, object]:
    """File name -> function making its bytes. Streamlit calls the function only when the button is
    clicked (deferred download), so a 512^3 upload does not mesh two STL files on every rerun."""
    return {
        "implant.nii.gz": lambda: V.nifti_bytes(implant),
        "reconstruction.nii.gz": lambda: V.nifti_bytes(rec),
        "implant.stl": lambda: V.stl_bytes(implant.data, implant.affine, "skullrec implant SPACE=LPS mm"),
        "reconstruction.stl": lambda: V.stl_bytes(rec.data, rec.affine, "skullrec reconstruction SPACE=LPS mm"),
    }


def mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------
# sidebar: input and checkpoint
# ------------------------------------------------------------------------------------------


def open_case(split: str, cid: str) -> None:
    """Button callback (runs before the widgets are built, so it may set their state)."""
    st.session_state["source"] = DATA_SOURCE
    st.session_state["split"] = split
    st.session_state["case"] = cid
    st.session_state["page"] = "Case"


def sidebar() -> tuple[str | None, V.CaseVolumes | None, str | None]:
    """Returns (input key, case, checkpoint label); the case is None when nothing valid is chosen."""
    sb = st.sidebar
    sb.title("skullrec viewer")
    cases = V.discover_cases(SETTINGS.data)
    n_cases = sum(len(v) for v in cases.values())
    sources = [DATA_SOURCE, UPLOAD_SOURCE] + ([INPUT_SOURCE] if SETTINGS.input is not None else [])
    if "source" not in st.session_state:
        st.session_state["source"] = INPUT_SOURCE if SETTINGS.input is not None else DATA_SOURCE if n_cases else UPLOAD_SOURCE
    source = sb.radio("Input", sources, key="source", horizontal=True)

    key = case = None
    if source == INPUT_SOURCE:  # skullrec view --in (a mask, or a CT with --ct; a file or a DICOM series folder)
        path = SETTINGS.input
        stamp = str(mtime_ns(path))
        sb.caption(f"{path}" + (f" (CT, bone >= {SETTINGS.ct_bone_hu:g} HU)" if SETTINGS.ct_bone_hu is not None else ""))
        try:
            vol = read_input(str(path), stamp, SETTINGS.ct_bone_hu, SETTINGS.series)
            case = V.CaseVolumes(name=path.name, defective=vol)
            key = f"input|{Path(path).resolve()}|{stamp}|{SETTINGS.ct_bone_hu}|{','.join(SETTINGS.series)}"
        except InputError as exc:
            sb.error(str(exc))
    elif source == DATA_SOURCE:
        if not cases:
            sb.info(f"No data set at {SETTINGS.data}: run `skullrec synth` (or `skullrec view --data DIR`), or upload a file.")
        else:
            # Default: a held-out split (its cases were not trained on), not the training split.
            split = sb.selectbox("Split", list(cases), index=V.default_split(list(cases)), key="split")
            ids = cases.get(split, [])
            if st.session_state.get("case") not in ids:
                st.session_state["case"] = ids[0]
            cid = sb.selectbox("Case", ids, key="case")
            folder = Path(SETTINGS.data) / split
            stamp = "|".join(str(mtime_ns(folder / k)) for k in ("defective", "complete", "implant"))
            try:
                case = load_case(str(SETTINGS.data), split, cid, stamp)
                key = f"data|{Path(SETTINGS.data).resolve()}|{split}|{cid}|{stamp}"
            except InputError as exc:
                sb.error(str(exc))
    else:
        up = sb.file_uploader(
            "Defective skull (.nii, .nii.gz, .nrrd)", key="upload", max_upload_size=SETTINGS.max_upload_mb,
            help=f"Any size and spacing: it goes through the same preparation as `skullrec predict`. Limit {SETTINGS.max_upload_mb} MB.",
        )
        up_truth = sb.file_uploader(
            "Ground-truth complete skull (optional)", key="upload_truth", max_upload_size=SETTINGS.max_upload_mb,
            help="Same grid as the defective skull; enables the metrics.",
        )
        use_t = sb.checkbox("Binarise non-binary values", key="use_threshold")
        t = sb.number_input("Threshold: bone is value > T", value=0.5, step=0.05, key="threshold", disabled=not use_t)
        threshold = float(t) if use_t else None
        if up is None:
            sb.info("Upload a defective skull to reconstruct it.")
        else:
            try:
                payload = up.getvalue()
                digest = hashlib.sha1(payload).hexdigest()
                vol = read_upload(up.name, digest, payload, threshold, SETTINGS.max_upload_mb)
                case = V.CaseVolumes(name=up.name, defective=vol)
                key = f"upload|{digest}|{threshold}"
                if up_truth is not None:
                    tpay = up_truth.getvalue()
                    tdig = hashlib.sha1(tpay).hexdigest()
                    truth = read_upload(up_truth.name, tdig, tpay, threshold, SETTINGS.max_upload_mb)
                    if truth.shape != vol.shape:
                        raise InputError(f"{up_truth.name}: shape {truth.shape} differs from {up.name} {vol.shape}")
                    implant = Volume((truth.data & (1 - vol.data)).astype(np.uint8), truth.affine, truth.header)
                    case = V.CaseVolumes(name=up.name, defective=vol, complete=truth, implant=implant)
                    key += f"|truth|{tdig}"
            except InputError as exc:
                st.error(str(exc))
                key = case = None

    sb.divider()
    ckpts = V.checkpoint_choices(SETTINGS.runs)
    ckpt = None
    if ckpts:
        labels = list(ckpts)
        # Default: the shipped stage 1 + stage 2, else the first run's final weights (last.safetensors), else the first file.
        default = 0 if labels[0] == V.SHIPPED_LABEL else next((i for i, lab in enumerate(labels) if lab.endswith("/last.safetensors")), 0)
        ckpt = sb.selectbox("Checkpoint", labels, index=default, key="ckpt")
    else:
        sb.warning(f"No checkpoints under {RUNS_TEXT}: train one with `skullrec train` (or `skullrec view --runs DIR`).")
    if sb.button("Reconstruct", type="primary", key="reconstruct", disabled=case is None or ckpt is None):
        st.session_state.setdefault("requested", set()).add((key, ckpt))
    return key, case, ckpt


def checkpoint_path(label: str) -> tuple[Path, Path | None]:
    """(stage-1, stage-2 or None) checkpoint files of a sidebar label."""
    return V.checkpoint_choices(SETTINGS.runs)[label]


@dataclass
class Recon:
    """A reconstruction shown on the page; ``key`` names input + checkpoint file version for the caches."""

    complete: Volume
    implant: Volume
    key: str


def run_reconstruction(key: str, case: V.CaseVolumes, label: str) -> Recon | None:
    """Reconstruct (cached); a broken checkpoint is an st.error, not a crash."""
    path, path2 = checkpoint_path(label)
    stamp = mtime_ns(path)
    stamp2 = 0 if path2 is None else mtime_ns(path2)
    try:
        complete, implant, problems, warnings = reconstruct(key, str(path), stamp, case.defective,
                                                            None if path2 is None else str(path2), stamp2)
    except InputError as exc:
        st.error(str(exc))
        return None
    for w in warnings:
        st.warning(f"{label}: {w}")
    if problems:
        # Like `skullrec predict`: an unusable result is not shown (or offered for download) as one.
        st.error(f"{label}: no usable reconstruction: {'; '.join(problems)}")
        return None
    return Recon(complete, implant, f"{key}|{path}|{stamp}|{path2}|{stamp2}")


# ------------------------------------------------------------------------------------------
# pages
# ------------------------------------------------------------------------------------------


def view_3d(key: str, case: V.CaseVolumes, recon: Recon | None, layers: list[str], opacity: float, chart_key: str, height: int = 520, title: str = ""):
    vols = {"defective": case.defective}
    if recon is not None:
        vols["reconstruction"], vols["implant"] = recon.complete, recon.implant
    if case.complete is not None:
        vols["truth"], vols["truth_implant"] = case.complete, case.implant
    traces, meshes = [], {}
    for layer in layers:
        if layer not in vols:
            continue
        # Predicted layers depend on the checkpoint too: their cache key is the reconstruction's.
        owner = recon.key if layer in ("reconstruction", "implant") else key
        verts, faces = surface(f"{owner}|{layer}", vols[layer].data, vols[layer].affine)
        meshes[layer] = verts
        # Implants stay opaque so that they stand out against see-through bone.
        traces.append(V.mesh_trace(verts, faces, layer, 1.0 if layer.endswith("implant") else opacity))
    ranges = V.scene_ranges(list(meshes.values()))
    camera = None
    if ranges is not None and "implant" in meshes:
        # After a reconstruction: look at the implant from outside the head (it may sit on top, out of a frontal view).
        skull = meshes.get("defective")
        if skull is None:
            skull, _ = surface(f"{key}|defective", case.defective.data, case.defective.affine)
        camera = V.implant_camera(meshes["implant"], skull, ranges)
    st.plotly_chart(V.figure_3d(traces, title=title, height=height, ranges=ranges, camera=camera), key=chart_key,
                    config={"displaylogo": False})


def page_case(key: str | None, case: V.CaseVolumes | None, ckpt: str | None) -> None:
    if case is None:
        st.info("Choose a case from the data set or upload a defective skull (sidebar).")
        return
    spacing = ", ".join(f"{s:.3g}" for s in case.defective.spacing)
    st.subheader(f"{case.name}")
    st.caption(f"grid {case.defective.shape[0]} x {case.defective.shape[1]} x {case.defective.shape[2]} voxels, spacing {spacing} mm"
               + ("" if case.complete is not None else " - no ground truth"))
    recon = None
    if ckpt is not None and (key, ckpt) in st.session_state.get("requested", set()):
        recon = run_reconstruction(key, case, ckpt)
    elif ckpt is not None:
        st.info("Press **Reconstruct** (sidebar) to run the model on this case.")

    available = ["defective"] + (["implant", "reconstruction"] if recon else []) + (["truth", "truth_implant"] if case.complete is not None else [])
    defaults = {"defective": True, "implant": True}
    cols = st.columns(len(available) + 1)
    layers = [k for c, k in zip(cols, available) if c.checkbox(V.LABELS[k], value=defaults.get(k, False), key=f"show_{k}")]
    opacity = cols[-1].slider("Bone opacity", 0.1, 1.0, 0.8, 0.05, key="opacity")

    left, right = st.columns([3, 2])
    with left:
        view_3d(key, case, recon, layers, opacity, chart_key="view3d")
    with right:
        axis_name = st.radio("Slice axis", list(V.AXES), horizontal=True, key="axis")
        axis = V.AXES[axis_name]
        n = case.defective.shape[axis]
        index = st.slider("Slice", 0, n - 1, n // 2, key=f"slice_{axis}")
        masks = {"defective": case.defective.data}
        if case.complete is not None:
            masks["truth"], masks["truth_implant"] = case.complete.data, case.implant.data
        if recon is not None:
            masks["reconstruction"], masks["implant"] = recon.complete.data, recon.implant.data
        # Draw order: anatomy, truth, prediction, implants on top.
        order = ["defective", "truth", "reconstruction", "truth_implant", "implant"]
        shown = {k: masks[k] for k in order if k in masks and k in layers}
        img = V.slice_overlay(shown, axis, index)
        # The same LPS mm as the 3D view's axes.
        sp, origin, titles = V.slice_axes(case.defective.affine, axis)
        st.plotly_chart(V.slice_figure(img, sp, origin=origin, axis_titles=titles), key="slice_view", config={"displaylogo": False})
        # Legend in the overlay's exact colours (constant labels, so the HTML is safe).
        st.markdown(" &nbsp; ".join(
            f'<span style="color:rgb{V.COLOURS[k]}">&#9632;</span> {V.LABELS[k]}' for k in shown
        ), unsafe_allow_html=True)

    if recon is None:
        return
    rec, implant = recon.complete, recon.implant
    if case.complete is not None:
        st.subheader("Metrics")
        rows = metric_rows(recon.key, rec, implant, case)
        value = {(r["target"], r["metric"], r["unit"]): r["value"] for r in rows}

        def shown(target: str, metric: str, unit: str, fmt: str) -> str:
            return V.metric_text(value.get((target, metric, unit)), unit, fmt)  # "—" when undefined or not computed

        m1, m2, m3, m4 = st.columns(4)
        m1.metric("DSC (skull)", shown("skull", "DSC", "", ".3f"))
        m2.metric("HD (skull)", shown("skull", "HD", "mm", ".2f"))
        m3.metric("HD95 (skull)", shown("skull", "HD95", "mm", ".2f"),
                  help="0 mm when at least 95% of the reconstruction's surface is the input's own bone; "
                       "the implant's HD95 (all metrics, below) measures the new part.")
        m4.metric("DSC (implant)", shown("implant", "DSC", "", ".3f"))
        with st.expander("All metrics (skull and implant; mm and voxels)"):
            st.dataframe(V.metric_table(rows), hide_index=True, key="metrics_table")
    st.subheader("Downloads (original grid)")
    files = download_makers(rec, implant)
    stem = V.safe_name(case.name.replace("/", "_")).split(".")[0]
    dcols = st.columns(4)
    for col, (name, payload) in zip(dcols, files.items()):
        mime = "model/stl" if name.endswith(".stl") else "application/gzip"
        col.download_button(f"{name.split('.')[0].title()} ({name.split('.', 1)[1].upper()})", payload, file_name=f"{stem}_{name}", mime=mime, key=f"dl_{name}")


def page_compare(key: str | None, case: V.CaseVolumes | None) -> None:
    ckpts = list(V.checkpoint_choices(SETTINGS.runs))
    if case is None:
        st.info("Choose a case first (sidebar).")
        return
    if len(ckpts) < 2:
        st.info(f"Comparing needs two checkpoints under {RUNS_TEXT} (found {len(ckpts)}).")
        return
    st.subheader(f"Compare two runs on {case.name}")
    c1, c2 = st.columns(2)
    ia, ib = V.default_pair(ckpts)
    a = c1.selectbox("Run A", ckpts, index=ia, key="run_a")
    b = c2.selectbox("Run B", ckpts, index=ib, key="run_b")
    if st.button("Compare", type="primary", key="compare"):
        st.session_state.setdefault("requested", set()).update({(key, a), (key, b)})
    requested = st.session_state.get("requested", set())
    if (key, a) not in requested or (key, b) not in requested:
        st.info("Press **Compare** to reconstruct this case with both checkpoints.")
        return
    opacity = st.slider("Bone opacity", 0.1, 1.0, 0.8, 0.05, key="compare_opacity")
    for col, label, tag in ((c1, a, "a"), (c2, b, "b")):
        with col:
            recon = run_reconstruction(key, case, label)
            if recon is None:
                continue
            view_3d(key, case, recon, ["defective", "implant"], opacity, chart_key=f"compare3d_{tag}", height=420, title=label)
            if case.complete is not None:
                rows = metric_rows(recon.key, recon.complete, recon.implant, case)
                st.dataframe(V.metric_table(rows), hide_index=True, key=f"compare_metrics_{tag}")


def page_results() -> None:
    st.subheader("Results browser")
    found = [SETTINGS.results] if SETTINGS.results is not None else V.discover_results()
    source = name = None
    if found:
        path = st.selectbox("Results CSV", found, format_func=str, key="results_path")
        source, name = path, str(path)
    up = st.file_uploader("... or upload a results CSV from `skullrec evaluate` / `skullrec experiment`", key="results_csv")
    if up is not None:
        source, name = up, up.name
    if source is None:
        st.info("No results CSV found under results/: run `skullrec experiment` or `skullrec evaluate`, or upload one.")
        return
    try:
        df = V.load_results(source, name=name)
    except InputError as exc:
        st.error(str(exc))
        return
    # One selectbox per bookkeeping column with several values (method, seed, epoch, defect set ...).
    filters = [c for c in FILTER_COLUMNS if c in df.columns and df[c].nunique() > 1]
    if filters:
        fcols = st.columns(len(filters))
        for col, c in zip(fcols, filters):
            choice = col.selectbox(c, ["all"] + sorted(df[c].dropna().unique().tolist(), key=str), key=f"filter_{c}")
            if choice != "all":
                df = df[df[c] == choice]
    metrics = V.metric_columns(df)
    c1, c2 = st.columns(2)
    metric = c1.selectbox("Sort by", metrics, key="sort_metric")
    order = c2.radio("Order", ["worst first", "best first"], horizontal=True, key="sort_order",
                     help="For DSC higher is better; for distances (HD, HD95) lower is better.")
    higher_better = metric.lower().startswith(("dsc", "bdsc"))
    ascending = (order == "worst first") == higher_better
    table = V.sort_results(df, metric, ascending)
    st.dataframe(table, hide_index=True, key="results_table")
    if table.empty:
        return

    split_col = next((c for c in ("split", "set") if c in table.columns), None)
    labels = [f"{r['case']}" + (f" ({r[split_col]})" if split_col else "") + f" - {metric} {r[metric]:.4g}" for _, r in table.iterrows()]
    pick = st.selectbox("Case", range(len(labels)), format_func=lambda i: labels[i], key="result_pick")
    row = table.iloc[int(pick)]
    found_case = V.find_case(SETTINGS.data, row["case"], str(row[split_col]) if split_col else None)
    if found_case is None:
        st.warning(f"Case {row['case']} is not in the data set at {SETTINGS.data}.")
    else:
        st.button("Open in case view", key="open_case", on_click=open_case, args=found_case)


# ------------------------------------------------------------------------------------------

if "page" not in st.session_state:
    st.session_state["page"] = "Case"
try:
    key, case, ckpt = sidebar()
    page = st.radio("View", PAGES, horizontal=True, key="page", label_visibility="collapsed")
    if page == "Case":
        page_case(key, case, ckpt)
    elif page == "Compare runs":
        page_compare(key, case)
    else:
        page_results()
except InputError as exc:
    st.error(str(exc))
except MemoryError:
    st.error("out of memory: the volume is too large for this machine")
except Exception as exc:  # noqa: BLE001 - a page must show a message, not a traceback; st.stop/rerun are BaseException
    st.error(f"the page failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
