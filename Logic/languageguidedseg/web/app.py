"""The web page: Slicer's slice views (trame-slicer) around the report loop of :mod:`languageguidedseg.controller`.

The page only wires widgets to the controller, as the Slicer module's widget does: the controller owns the loop
(approximate, fill and mark the box, live refine, run / cancel / progress, writing the segment into MRML). Rendering
happens on the server (off-screen); the page receives images of the views.

Everything runs on the server's event loop thread, which plays the part of Slicer's GUI thread: trame's state
callbacks, the upload handler, and the task that polls the controller. Only image reading, the model preload and
the controller's worker run elsewhere, and they touch no MRML node.
"""

# trame and trame-slicer ship no type information.
# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from trame.app import TrameApp
from trame.widgets import client, html
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from trame_vuetify.widgets import vuetify3 as v3
from vtkmodules.vtkCommonCore import vtkCommand, vtkObject

from .. import mrml
from ..controller import LoopEvent, ReportLoopController, ReportStatus, Warnings
from ..errors import LgsegError
from ..fileio import full_suffix
from ..imageio import spatial_shape, write_mask
from ..options import AUTO_MODEL
from ..parameters import ReportLoopParameters
from ..runner import ThreadRunner
from .access import add_security_headers, same_origin_middleware, token_middleware
from .uploads import UploadFolder, upload_handler
from .viewer import WINDOW_PRESETS, looks_like_ct, orientation_letters, segment_size

logger = logging.getLogger(__name__)

# The live loop's latency budget (docs/web.md, "How live it is"): the controller is polled often enough that a
# finished run or a due live update waits at most 20 ms, and a pause in typing of 0.15 s (a quick typist's keystrokes
# come 0.1 s apart) starts the update; a stale run is dropped anyway.
POLL_SECONDS = 0.02
LIVE_DEBOUNCE_SECONDS = 0.15
# One JPEG per view update, at the quality trame-rca uses for its "still" frame: with a lower interactive quality it
# renders every update twice (the second time 5 frame periods later), and software rendering takes ~0.1 s a frame on a
# 2-core CPU, during which the server's event loop does nothing else.
FRAME_QUALITY = 90
STATIC = Path(__file__).resolve().parent / "static"
DOWNLOADS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "png": ".png"}


class WebApp(TrameApp):
    """One page, one scene: the image or volume being read, its segmentation, the report loop."""

    def __init__(self, paths: Sequence[Path], *, model: Optional[str] = None, device: str = "auto",
                 uploads: UploadFolder, token: Optional[str] = None, trusted_proxy: Optional[str] = None,
                 server: Any = None):
        super().__init__(server)
        self._uploads = uploads
        self._token = token
        self._trusted_proxy = trusted_proxy
        # The Image list: the files given on the command line, then the uploads (path, title), in that order.
        self._files = [Path(path) for path in paths]
        self._titles = [path.name for path in self._files]
        self._shown: Optional[Path] = None  # the file of the image shown
        self._window_observer: Optional[tuple[Any, int]] = None  # (display node, observer tag)
        # The segment as shown and the one before the last run (for Undo; None: none), bit-packed: a CT's mask
        # costs an eighth of a byte per voxel.
        self._previous_mask: Optional[np.ndarray] = None
        self._mask: Optional[np.ndarray] = None
        self._image: Any = None  # the SimpleITK image shown: the reference grid for downloads
        self._image_name = ""
        self._tasks: set = set()  # running asyncio tasks: referenced, so that none is garbage-collected mid-way
        self._preloading = False

        # No --model: "auto", the installed model made for each image opened.
        self.parameters = ReportLoopParameters(model=model or AUTO_MODEL, device=device, scope="slice",
                                               sliceView="Red")
        self.slicer = SlicerApp()
        # Left-drag in a slice view adjusts window/level, as Slicer's "Adjust window/level" mouse mode does (the
        # wheel still scrolls slices, right-drag zooms, middle-drag pans): this page has no other use for left-drag.
        interaction = self.slicer.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        if interaction is not None:
            interaction.SetCurrentInteractionMode(interaction.AdjustWindowLevel)
        # The views' own overlay (name, slice k of N, orientation letters, slider for volumes); views update at the full
        # frame rate whether or not the mouse is over them (a reader types in the report box while the mask changes).
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=self._view_ui,
                               interactive_quality=FRAME_QUALITY, blur_fps=None)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        axial, coronal, sagittal = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                                    ViewLayoutDefinition.sagittal_view())
        # Creating the views warns, once per view, that VTK 9.6 deprecates an event trame-slicer 2.0 listens to;
        # nothing a user can act on, so VTK's warnings are off while they are created (and restored after).
        warnings_shown = vtkObject.GetGlobalWarningDisplay()
        vtkObject.GlobalWarningDisplayOff()
        try:
            self.layouts.register_layout_dict({
                "image": Layout(LayoutDirection.Vertical, [axial]),
                "volume": Layout(LayoutDirection.Horizontal,
                                 [axial, Layout(LayoutDirection.Vertical, [coronal, sagittal])]),
            })
        finally:
            vtkObject.SetGlobalWarningDisplay(warnings_shown)
        self.layouts.set_layout("image")
        # A view is fitted to the image when the page has given it its size: views are created (and an image may
        # be opened) before the browser lays them out, and a fit at the wrong size leaves the image cropped.
        self._fit_pending: set = set()
        for view in self.slicer.view_manager.get_slice_views():
            view.render_window().AddObserver(vtkCommand.WindowResizeEvent,
                                             lambda *_, view=view: self._fit_after_resize(view))

        self._runner = ThreadRunner()  # the event loop's thread idles without holding the GIL: a thread will do
        self.controller = ReportLoopController(self.parameters, slice_node_for=self._slice_node, runner=self._runner,
                                               run_button="Segment", debounce_s=LIVE_DEBOUNCE_SECONDS)
        if model:
            self.controller.select_model(model)
        self._event_handlers: dict[LoopEvent, Callable[[Any], None]] = {
            LoopEvent.RUNNING: self._show_running, LoopEvent.PROGRESS: self._show_progress,
            LoopEvent.STATUS: self._show_status, LoopEvent.REPORT: self._show_report_status,
            LoopEvent.RESULT: self._show_result, LoopEvent.ERROR: lambda exc: self._show_error(_one_line(exc)),
            LoopEvent.WARNINGS: self._show_warnings,
        }
        self.controller.add_observer(self._on_controller_event)

        self.server.enable_module({"serve": {"__lgseg": str(STATIC)},
                                   "scripts": ["__lgseg/upload.js", "__lgseg/keyboard.js"]})
        self.server.trigger("lg_cancel")(self._on_cancel)  # Escape (keyboard.js)
        self._initial_state()
        self._build_ui()
        ctrl = self.server.controller
        ctrl.on_server_bind.add(self._bind_http)
        ctrl.on_server_ready.add(self._on_ready)
        ctrl.on_client_connected.add(self._render_all)
        self.state.change("lg_report")(self._on_report)
        self.state.change("lg_model")(self._on_model)
        self.state.change("lg_scope")(self._on_scope)
        self.state.change("lg_live")(self._on_live)
        self.state.change("lg_sides")(self._on_sides)
        self.state.change("lg_opacity")(self._on_opacity)
        self.state.change("lg_file")(self._on_file)

    # State and page -----------------------------------------------------------------------------------------

    def _initial_state(self) -> None:
        selected = self.parameters.model or self.controller.default_model_name()
        self.state.update({
            "trame__title": "LanguageGuidedSeg",
            "lg_files": self._file_items(),
            "lg_file": None,
            "lg_models": self._model_items(selected),
            "lg_model": selected,
            "lg_model_info": self._model_info(selected),
            "lg_report": "",
            "lg_report_kind": "empty",
            "lg_report_message": self.controller.report_status().message,
            "lg_domain_warning": "",
            "lg_report_warnings": [],
            "lg_segment_anyway": False,
            "lg_live": True,
            "lg_scope": "slice",
            "lg_sides": self.parameters.sides,
            "lg_sides_label": self.controller.sides_label(),
            "lg_is_volume": False,
            "lg_loaded": False,
            "lg_busy": False,
            "lg_long_run": False,
            "lg_progress": 0,
            "lg_status": "Open an image or a volume.",
            "lg_error": "",
            "lg_opacity": 0.5,
            "lg_has_segment": False,
            "lg_segment": {},
            "lg_uploading": False,
            "lg_views": {},
            "lg_can_window": False,
            "lg_is_ct": False,
            "lg_window": "",
            "lg_can_undo": False,
        })

    def _file_items(self) -> list[dict]:
        return [{"title": title, "value": index} for index, title in enumerate(self._titles)]

    def _model_items(self, selected: str) -> list[dict]:
        """The model selector's entries: "Automatic" (with the model it chose for the image shown), the installed
        models, and a model folder given with --model under its folder name."""
        models = self.controller.available_models()
        items = [{"title": self.controller.model_title(AUTO_MODEL), "value": AUTO_MODEL}]
        items += [{"title": m["name"], "value": m["name"]} for m in models]
        if selected not in {item["value"] for item in items}:
            items.append({"title": f"{Path(selected).name} (folder)", "value": selected})
        return items

    def _model_info(self, name: str) -> str:
        if name == AUTO_MODEL:
            chosen = self.controller.model_choice()
            if chosen is None:
                return "Chooses the installed model whose training images the image looks like."
            name = chosen
        info = {m["name"]: m for m in self.controller.available_models()}.get(name)
        if info is None:
            return ""
        return f"{info['task']} · licence: {info['licence'] or 'not stated'}"

    def _show_model_choice(self) -> None:
        """The selector's "Automatic (name)" and the model's description follow the choice made for the image."""
        self.state.lg_models = self._model_items(self.state.lg_model)
        self.state.lg_model_info = self._model_info(self.state.lg_model)

    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, width=400) as layout:
            self.ui = layout
            layout.title.set_text("LanguageGuidedSeg")
            layout.footer.hide()  # trame's footer: links and version details a reader does not need
            client.Style("html { overflow-y: hidden; } .lg-report textarea { font-size: 0.95rem; }")
            with layout.toolbar:
                v3.VSpacer()
                html.Span("{{ lg_status }}", id="lg-status", classes="text-body-2 mx-4")
            with layout.drawer:
                self._build_controls()
            with layout.content:
                with html.Div(id="lg-views", style="height: calc(100vh - 64px); width: 100%;"):
                    self.layouts.initialize_layout_grid(layout)

    def _build_controls(self) -> None:
        with html.Div(classes="pa-3 d-flex flex-column ga-2"):
            v3.VAlert(v_if="lg_error", id="lg-error", text=("lg_error",), type="error", density="compact",
                      closable=True, click_close="lg_error = ''")
            # Open: one of the files given on the command line, or an upload (a file, or a DICOM folder).
            v3.VSelect(v_if="lg_files.length", label="Image", items=("lg_files",), v_model=("lg_file",),
                       id="lg-file", density="compact", hide_details=True, disabled=("lg_busy",))
            with html.Div(classes="d-flex ga-2"):
                html.Input(type="file", id="lg-upload", style="display: none",
                           change="window.lgsegUpload($event.target.files); $event.target.value = ''")
                html.Input(type="file", id="lg-upload-folder", style="display: none", raw_attrs=["webkitdirectory"],
                           change="window.lgsegUpload($event.target.files); $event.target.value = ''")
                v3.VBtn("Upload image", prepend_icon="mdi-file-upload", size="small", variant="tonal",
                        id="lg-upload-button", click="window.lgsegChoose('lg-upload')", loading=("lg_uploading",),
                        disabled=("lg_busy",))
                v3.VBtn("DICOM folder", prepend_icon="mdi-folder-upload", size="small", variant="tonal",
                        id="lg-upload-folder-button", click="window.lgsegChoose('lg-upload-folder')",
                        disabled=("lg_busy",))
            v3.VSelect(label="Model", items=("lg_models",), v_model=("lg_model",), id="lg-model",
                       density="compact", hide_details=True, disabled=("lg_busy",))
            html.Div("{{ lg_model_info }}", id="lg-model-info", classes="text-caption text-medium-emphasis")
            v3.VTextarea(label="Report", v_model=("lg_report",), id="lg-report", rows=4, auto_grow=True,
                         hide_details="auto", classes="lg-report", disabled=("lg_long_run",),
                         placeholder="Type or paste the report; leave empty to approximate it from the image",
                         hint="Enter segments, Shift+Enter starts a new line, Escape cancels",
                         persistent_hint=True)  # always there: a hint that comes and goes moves the buttons below
            html.Div("{{ lg_report_message }}", id="lg-report-status",
                     classes=("lg_report_kind === 'approximated' ? 'text-caption text-warning font-italic' "
                              ": 'text-caption text-medium-emphasis'",))
            # Beside the report box, not a dialog: it stays until a result has nothing to warn about.
            with v3.VAlert(v_if="lg_domain_warning || lg_report_warnings.length", id="lg-warnings", type="warning",
                           variant="tonal", density="compact"):
                html.Div("{{ lg_domain_warning }}", v_if="lg_domain_warning", id="lg-domain-warning",
                         classes="text-body-2")
                html.Div("{{ warning }}", v_for="warning in lg_report_warnings",
                         classes="text-body-2 lg-report-warning")
                v3.VBtn("Segment anyway", id="lg-segment-anyway", v_if="lg_segment_anyway", size="small",
                        variant="outlined", classes="mt-2", click=self._on_segment_anyway, disabled=("lg_busy",))
            with html.Div(classes="d-flex align-center ga-2"):
                with v3.VBtnToggle(v_model=("lg_sides",), id="lg-sides", mandatory=True, density="compact",
                                   variant="outlined", divided=True, disabled=("lg_busy",)):
                    v3.VBtn("Patient's sides", value="patient", size="small", id="lg-sides-patient")
                    v3.VBtn("Image sides", value="image", size="small", id="lg-sides-image")
            html.Div("{{ lg_sides_label }}", id="lg-sides-label", classes="text-caption text-medium-emphasis")
            v3.VSwitch(label="Update while typing", v_model=("lg_live",), id="lg-live", density="compact",
                       hide_details=True, color="primary", disabled=("lg_scope !== 'slice'",))
            with v3.VRadioGroup(v_if="lg_is_volume", v_model=("lg_scope",), id="lg-scope", inline=True,
                                density="compact", hide_details=True, disabled=("lg_busy",)):
                v3.VRadio(label="Current slice", value="slice", id="lg-scope-slice")
                v3.VRadio(label="Whole volume", value="volume", id="lg-scope-volume")
            with html.Div(classes="d-flex ga-2"):
                # The click carries what the page shows: trame may send a pending state change after the click.
                v3.VBtn("Segment", id="lg-segment", color="primary",
                        click=(self._on_segment, "[lg_report || '', lg_scope, lg_sides]"),
                        disabled=("!lg_loaded || lg_busy",))
                v3.VBtn("Cancel", id="lg-cancel", v_if="lg_long_run", color="error", variant="tonal",
                        click=self._on_cancel)
                v3.VBtn("Undo", id="lg-undo", prepend_icon="mdi-undo", variant="tonal",
                        click=self._undo, disabled=("!lg_can_undo || lg_busy",))
            v3.VProgressLinear(v_if="lg_long_run", model_value=("lg_progress",), id="lg-progress", height=8,
                               color="primary", rounded=True)
            with html.Div(v_if="lg_can_window", id="lg-window-presets", classes="d-flex flex-wrap align-center ga-1"):
                html.Span("Window", classes="text-body-2 mr-1")
                for preset, label in (("auto", "Auto"), *((name, name.capitalize()) for name in WINDOW_PRESETS),
                                      ("reset", "Reset")):
                    v3.VBtn(label, id=f"lg-window-{preset.replace(' ', '-')}", size="small", variant="tonal",
                            v_if="lg_is_ct" if preset in WINDOW_PRESETS else None,
                            click=(self._set_window, f"['{preset}']"))
            v3.VSlider(label="Segment opacity", v_model=("lg_opacity",), min=0, max=1, step=0.05, id="lg-opacity",
                       density="compact", hide_details=True, disabled=("!lg_has_segment",))
            html.Div("{{ lg_segment.text }}", v_if="lg_has_segment", id="lg-segment-summary",
                     classes="text-caption",
                     # The segment as the server's node holds it, for scripts and tests that read the page.
                     raw_attrs=[f':data-{key}="lg_segment.{key}"' for key in ("name", "color", "voxels", "sha256")])
            with html.Div(classes="d-flex flex-wrap ga-2"):
                trigger = self.server.controller.trigger_name(self._download)
                for fmt, label in (("seg.nrrd", "Download .seg.nrrd"), ("nii.gz", "NIfTI"), ("png", "PNG")):
                    v3.VBtn(label, id=f"lg-download-{fmt.replace('.', '-')}", size="small", variant="tonal",
                            prepend_icon="mdi-download", disabled=("!lg_has_segment || lg_busy",),
                            v_show="!lg_is_volume" if fmt == "png" else "true",
                            click=(f"utils.download(lg_segment.stem + '{DOWNLOADS[fmt]}', "
                                   f"trigger('{trigger}', ['{fmt}']), 'application/octet-stream')"))

    # Server life cycle ---------------------------------------------------------------------------------------

    def _bind_http(self, web_server: Any) -> None:
        """Same-origin and token checks on every request, and the upload route (before wslink's static routes)."""
        app = web_server.app
        add_security_headers(app)
        app.middlewares.append(same_origin_middleware(loopback_names_only=self._token is None,
                                                      trusted_proxy=self._trusted_proxy))
        if self._token is not None:
            app.middlewares.append(token_middleware(self._token))
        app.router.add_post("/upload", upload_handler(self._uploads, self.open_path, self._report_error))

    def _on_ready(self, **_: Any) -> None:
        self._start(self._poll())
        if self._files:
            with self.state:
                self.state.lg_file = 0  # opens it (see _on_file)

    def _load_model(self) -> None:
        model = self.parameters.model
        # "auto" judges the image with every installed model: load them all.
        names = [m["name"] for m in self.controller.available_models()] if model == AUTO_MODEL else [model]
        try:
            for name in names:
                self._runner.models.get(name or None, self.parameters.device)
        except Exception:  # noqa: BLE001 - the first run loads it again and reports the error in the page
            logger.debug("model preload failed", exc_info=True)

    def _start(self, coroutine: Any) -> None:
        task = asyncio.get_event_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _render_all(self, **_: Any) -> None:
        # Renders requested before the page connected reached no one: draw every view again for the new page.
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    async def _poll(self) -> None:
        """The controller's clock: deliver the worker's news and start due live runs, on this (the GUI) thread."""
        while True:
            try:
                with self.state:
                    self.controller.poll()
            except Exception as exc:  # noqa: BLE001 - the page must keep working: the error is shown and logged
                logger.exception("report loop")
                self._report_error(_one_line(exc))
            await asyncio.sleep(POLL_SECONDS)

    # Opening images -------------------------------------------------------------------------------------------

    def _on_file(self, lg_file: Optional[int] = None, **_: Any) -> None:
        if lg_file is None or not 0 <= lg_file < len(self._files) or self._files[lg_file] == self._shown:
            return
        path = self._files[lg_file]
        self._start(self.open_path(path, path.name))  # shows its own errors

    async def open_path(self, path: Path, name: str) -> Optional[str]:
        """Read ``path`` with the server's limits (:meth:`UploadFolder.read`, in a worker thread) and show it; the
        error message, or None."""
        if self.controller.running:
            message = "a segmentation is running; cancel it or wait for it, then open the image again"
            with self.state:
                self._show_error(message)
            return message
        previous = self.state.lg_status
        with self.state:
            self.state.lg_status = f"Reading {name}..."
        try:
            image, note = await asyncio.get_event_loop().run_in_executor(None, self._uploads.read, path)
        except LgsegError as exc:
            with self.state:
                self._show_error(str(exc))
                self.state.lg_status = previous  # the image shown before, if any, is still there
            return str(exc)
        with self.state:
            self._show_image(image, path, name, note)
        return None

    def _show_image(self, image: Any, path: Path, name: str, note: str) -> None:
        """Show ``image`` (read from ``path``, which the user knows as ``name``) in new views, the status line naming
        its size and ``note``, a conversion made for the viewer."""
        scene = self.slicer.scene
        self.controller.abandon()
        for node in (self.parameters.outputSegmentation, self.parameters.inputVolume):
            if node is not None:
                mrml.remove_node(node)
        self.parameters.outputSegmentation = None
        stem = name[:-len(full_suffix(name))] if full_suffix(name) else name
        volume = mrml.add_volume_node(scene, image, stem or "image", source=path)
        if volume.GetDisplayNode() is None:
            volume.CreateDefaultDisplayNodes()  # RGB volumes: shown as colour, as Slicer shows them
        self._image, self._image_name = image, stem or "image"
        self._uploads.show(path)  # the upload of the image replaced is deleted
        self._list_file(path, name)
        is_volume = len(spatial_shape(image)) == 3 and spatial_shape(image)[0] > 1
        self.layouts.set_layout("volume" if is_volume else "image")
        self.slicer.display_manager.show_volume_in_slice_background(volume)
        self.slicer.display_manager.reset_views()
        self._fit_pending = {view.get_singleton_tag() for view in self.slicer.view_manager.get_slice_views()}
        self.parameters.inputVolume = volume
        self._previous_mask = self._mask = None
        self._watch_window(volume, image)
        self.controller.clear_report()
        self.controller.watch_slices()
        self._show_sides_label()  # from the new image's geometry
        self._show_warnings(self.controller.warnings)  # those of the previous image go
        self._show_model_choice()  # "auto" chooses again for this image
        self.state.update({
            "lg_loaded": True, "lg_is_volume": is_volume, "lg_has_segment": False, "lg_segment": {},
            "lg_error": "", "lg_scope": self.parameters.scope if is_volume else "slice",
            "lg_file": self._files.index(path), "lg_can_undo": False,
            "lg_status": f"{name}: {' x '.join(str(s) for s in reversed(spatial_shape(image)))} "
                         f"{'volume' if is_volume else 'image'}{f' ({note})' if note else ''}. "
                         "Type a report or press Segment.",
        })
        self._show_views()
        self._render_all()
        if not self._preloading:
            # Load the model while the user reads the image, so that the first Segment does not wait for it; into
            # the controller's own cache. A failure here is reported by the first run, which loads it again.
            self._preloading = True
            threading.Thread(target=self._load_model, name="LanguageGuidedSeg model", daemon=True).start()

    def _list_file(self, path: Path, name: str) -> None:
        """Put an upload in the Image list, and take out uploads the server has deleted since (an upload is deleted
        when another image replaces it, see UploadFolder.show)."""
        self._shown = path
        if path not in self._files:
            self._files.append(path)
            self._titles.append(f"{name} (uploaded)")
        kept = [index for index, file in enumerate(self._files) if file.exists()]
        self._files = [self._files[index] for index in kept]
        self._titles = [self._titles[index] for index in kept]
        self.state.lg_files = self._file_items()

    # The views: names, slices, orientation, window/level ---------------------------------------------------------

    def _view_ui(self, server: Any, view_id: str, view: Any) -> None:
        """The overlay of one slice view (trame-slicer calls this as it creates the view): its name, the slice
        number out of the total, the orientation letters at its edges, the window/level, a button that fits the image
        again, and a slice slider for volumes only. Text on the image has a shadow so it reads on white too."""
        from trame_slicer.app.logic.slice_view_logic import connect_slice_view_slider_to_state
        from trame_slicer.app.ui import Slider

        tag = view.get_singleton_tag()
        info = f"lg_views['{tag}']"
        view.modified.connect(lambda *_: self._show_views())  # a scrolled, moved or refitted view
        # No multisampling (VTK's default is 8 samples a pixel): a slice view shows an image, whose pixels gain nothing
        # from it, and software rendering (Mesa, no GPU) takes several times longer with it.
        view.render_window().SetMultiSamples(0)
        text = "position: absolute; color: #fff; text-shadow: 0 0 3px #000, 0 0 2px #000; pointer-events: none;"
        with html.Div(v_if=info, classes=f"text-body-2 lg-overlay-{tag}",
                      style="position: absolute; inset: 0; pointer-events: none;"):
            with html.Div(style=f"{text} top: 6px; left: 10px;", classes=f"lg-view-info lg-view-{tag}"):
                html.Div(f"{{{{ {info}.name }}}}", classes="font-weight-bold lg-view-name")
                html.Div(f"{{{{ {info}.slice }}}}", v_if=f"{info}.slice", classes="lg-view-slice")
            html.Div("{{ lg_window }}", v_if="lg_window", style=f"{text} top: 6px; right: 44px;",
                     classes="lg-view-window")
            for edge, where in (("left", "left: 6px; top: 50%;"), ("right", "right: 8px; top: 50%;"),
                                ("top", "top: 6px; left: 50%;"), ("bottom", "bottom: 34px; left: 50%;")):
                html.Div(f"{{{{ {info}.letters.{edge} }}}}", style=f"{text} {where} font-size: 1.1rem;",
                         classes=f"font-weight-bold lg-letter lg-letter-{edge}",
                         title=(f"{info}.assumed ? 'orientation assumed: radiological display (the file gives none)' "
                                ": 'patient direction'",))
        with v3.VBtn(size="small", variant="text", density="comfortable", icon=True,
                     style="position: absolute; top: 2px; right: 4px;", classes="lg-fit",
                     click=lambda: self._fit(view)):
            v3.VIcon("mdi-fit-to-screen-outline", color="white")
            v3.VTooltip("Fit the image to the view", activator="parent", location="left")
        with html.Div(v_if="lg_is_volume", style="position: absolute; bottom: 0; left: 0; width: 100%;",
                      classes="px-2"):
            Slider(classes="lg-slice-slider", typed_state=connect_slice_view_slider_to_state(server, view),
                   theme="dark", density="compact")

    def _fit(self, view: Any) -> None:
        view.reset_view()
        view.schedule_render()

    def _show_views(self) -> None:
        """Each slice view's name, slice k of N and orientation letters, from the scene (after any view change)."""
        volume = self.parameters.inputVolume
        if volume is None:
            return
        assumed = mrml.volume_geometry(volume) is None  # a PNG or JPEG: radiological display assumed
        image_data = volume.GetImageData()
        colour = image_data is not None and image_data.GetNumberOfScalarComponents() > 1
        dims = mrml.volume_dimensions(volume)
        views = {}
        for view in self.slicer.view_manager.get_slice_views():
            node = self._slice_node(view.get_singleton_tag())
            if node is None:
                continue
            matrix = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
            letters = orientation_letters(matrix)
            name, where = "Image", ""
            if self.state.lg_is_volume:
                name = view.get_orientation()
                try:
                    axis, index = mrml.slice_axis_and_index(node, volume)
                    where = f"slice {index + 1} / {dims[axis]}"
                except LgsegError:  # a volume with a zero spacing: no slice number to give
                    pass
            if assumed and colour:
                # A colour photograph (a colonoscopy frame) has no patient directions.
                letters = {"left": "", "right": "", "top": "", "bottom": ""}
            elif assumed:
                # A grey 2D image without orientation: only left and right, as the engine assumes them for reports.
                letters = {"left": letters["left"], "right": letters["right"], "top": "", "bottom": ""}
            views[view.get_singleton_tag()] = {"name": name, "slice": where, "letters": letters, "assumed": assumed}
        if views != self.state.lg_views:
            with self.state:
                self.state.lg_views = views

    def _watch_window(self, volume: Any, image: Any) -> None:
        """Follow the shown volume's window/level (dragged in a view, or a preset) in the views' corner."""
        if self._window_observer is not None:  # the image replaced
            self._window_observer[0].RemoveObserver(self._window_observer[1])
            self._window_observer = None
        display = volume.GetDisplayNode()
        scalar = image.GetNumberOfComponentsPerPixel() == 1 and hasattr(display, "GetWindow")
        is_ct = False
        if scalar:
            import SimpleITK as sitk

            statistics = sitk.MinimumMaximumImageFilter()
            statistics.Execute(image)
            is_ct = looks_like_ct(statistics.GetMinimum())
            self._window_observer = (display, display.AddObserver(vtkCommand.ModifiedEvent,
                                                                  lambda *_: self._show_window()))
        self.state.update({"lg_can_window": scalar, "lg_is_ct": is_ct})
        self._show_window()

    def _show_window(self) -> None:
        volume = self.parameters.inputVolume
        display = volume.GetDisplayNode() if volume is not None else None
        text = ""
        if self.state.lg_can_window and display is not None:
            text = f"W {display.GetWindow():.0f} L {display.GetLevel():.0f}"
        if text != self.state.lg_window:
            with self.state:
                self.state.lg_window = text

    def _set_window(self, preset: str) -> None:
        """The window/level buttons: Auto (the histogram's window, as Slicer's Auto), a CT preset, or Reset (the
        window the image opened with, and every view fitted to the image again)."""
        volume = self.parameters.inputVolume
        display = volume.GetDisplayNode() if volume is not None else None
        if display is None or not self.state.lg_can_window:
            return
        if preset in WINDOW_PRESETS:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*WINDOW_PRESETS[preset])
        else:  # "auto" and "reset"
            display.AutoWindowLevelOn()
        if preset == "reset":
            for view in self.slicer.view_manager.get_slice_views():
                self._fit(view)

    def _fit_after_resize(self, view: Any) -> None:
        if view.get_singleton_tag() in self._fit_pending:
            self._fit_pending.discard(view.get_singleton_tag())
            view.reset_view()
            view.schedule_render()

    def _slice_node(self, view: str) -> Any:
        slice_view = self.slicer.view_manager.get_view(view)
        return None if slice_view is None else self.slicer.scene.GetNodeByID(slice_view.get_view_node_id())

    # Widgets -> controller ------------------------------------------------------------------------------------

    def _on_report(self, lg_report: str = "", **_: Any) -> None:
        self.controller.set_report(lg_report or "")

    def _on_model(self, lg_model: str = "", **_: Any) -> None:
        self.controller.select_model(lg_model or "")
        self._show_model_choice()
        self._show_sides_label()  # models differ in what left and right mean in their reports
        self.controller.settings_changed()  # live: the mask follows, as it follows an edit of the report

    def _on_scope(self, lg_scope: str = "slice", **_: Any) -> None:
        self.parameters.scope = lg_scope

    def _on_live(self, lg_live: bool = True, **_: Any) -> None:
        self.parameters.liveUpdate = bool(lg_live)

    def _on_sides(self, lg_sides: str = "patient", **_: Any) -> None:
        if lg_sides == self.parameters.sides:
            return
        self.parameters.sides = lg_sides
        self._show_sides_label()
        self.controller.settings_changed()  # live: the same words now name the other sides

    def _on_opacity(self, lg_opacity: float = 0.5, **_: Any) -> None:
        node = self.parameters.outputSegmentation
        if node is not None and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetOpacity(float(lg_opacity))

    def _on_segment(self, report: Optional[str] = None, scope: Optional[str] = None,
                    sides: Optional[str] = None) -> None:
        """The Segment button, with the report, scope and sides the page shows when it was pressed."""
        if scope is not None:
            self._on_scope(scope)
            self._on_sides(sides or self.parameters.sides)
            self.controller.set_report(report or "")
        if self.controller.apply_cancels:
            # A click that reached the server before the page disabled the button: that run is this one (the page
            # cancels with its own Cancel button, never with a second Segment).
            return
        try:
            # A running live run is dropped and this run follows it; a live run that is only scheduled is replaced.
            self.controller.apply()
        except LgsegError as exc:
            self._show_error(str(exc))

    def _on_segment_anyway(self) -> None:
        """The "Segment anyway" button: the mask of an image outside the model's domain, without a report."""
        try:
            self.controller.segment_anyway()
        except LgsegError as exc:
            self._show_error(str(exc))

    def _on_cancel(self) -> None:
        self.controller.cancel()

    def _undo(self) -> None:
        """The Undo button: the segment as it was before the last segmentation (none, if there was none)."""
        node, result = self.parameters.outputSegmentation, self.controller.last_result
        if not self.state.lg_can_undo or self.controller.running or node is None or result is None:
            return
        self.controller.cancel()  # a pending live update would redo what is undone
        segment = node.GetSegmentation().GetSegment(result.segment_id)
        previous = self._previous_mask
        if previous is None:
            # No segment before the last run: the segmentation goes (a later run makes a new one).
            self.parameters.outputSegmentation = None
            mrml.remove_node(node)
            self._mask = None
            self.state.update({"lg_has_segment": False, "lg_segment": {}})
        else:
            shape = spatial_shape(self._image)
            mask = np.unpackbits(previous, count=int(np.prod(shape))).reshape(shape)
            mrml.write_mask(mask, self.parameters.inputVolume, node, segment_name=segment.GetName(),
                            color=segment.GetColor())
            self._show_segment(result, undone=True)
        self._previous_mask = None
        self.state.update({"lg_can_undo": False, "lg_status": "Undone: the segment is as it was before the last "
                                                               "segmentation."})

    # Controller -> widgets ------------------------------------------------------------------------------------

    def _on_controller_event(self, event: LoopEvent, payload: Any) -> None:
        handler = self._event_handlers.get(event)
        if handler is not None:
            handler(payload)

    def _show_running(self, running: bool) -> None:
        state = self.state
        state.lg_busy = bool(running)
        state.lg_long_run = bool(running) and self.parameters.scope == "volume" and state.lg_is_volume
        state.lg_progress = 0
        if running:
            state.lg_error = ""

    def _show_progress(self, progress: tuple[int, int]) -> None:
        done, total = progress
        self.state.lg_progress = round(100 * done / max(total, 1))

    def _show_status(self, message: str) -> None:
        self.state.lg_status = message

    def _show_report_status(self, status: ReportStatus) -> None:
        if (self.state.lg_report or "") != status.text:
            self.state.lg_report = status.text  # only when the controller changed the text
        self.state.lg_report_kind = status.kind
        self.state.lg_report_message = status.message

    def _show_result(self, result: Any) -> None:
        self._show_segment(result)
        self._show_sides_label()
        self._show_model_choice()

    def _show_warnings(self, warnings: Warnings) -> None:
        self.state.lg_domain_warning = warnings.domain
        self.state.lg_report_warnings = list(warnings.report)
        self.state.lg_segment_anyway = warnings.segment_anyway

    def _show_error(self, message: str) -> None:
        self.state.lg_error = message

    def _report_error(self, message: str) -> None:
        """Show an error from outside trame's callbacks (the upload route): pushed to the page at once."""
        with self.state:
            self._show_error(message)

    def _show_sides_label(self) -> None:
        self.state.lg_sides_label = self.controller.sides_label()

    def _show_segment(self, result: Any, undone: bool = False) -> None:
        """Summarise the segment as the scene holds it (read back from the node, not from the run's mask), and keep
        the one before for Undo (``undone``: this is that one, restored)."""
        node, segment_id = result.segmentation_node, result.segment_id
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity(float(self.state.lg_opacity))
        mask = mrml.segment_mask(node, segment_id, self.parameters.inputVolume)
        segment = node.GetSegmentation().GetSegment(segment_id)
        color = "#" + "".join(f"{round(255 * c):02x}" for c in segment.GetColor())
        voxels = int(np.count_nonzero(mask))
        binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
        if not undone:
            self._previous_mask = self._mask
            self.state.lg_can_undo = True
        self._mask = np.packbits(binary)
        volume = self.parameters.inputVolume
        size = segment_size(binary.reshape(spatial_shape(self._image)), self._image.GetSpacing(),
                            axis=result.axis if result.slice_index is not None else None,
                            slice_index=result.slice_index, is_volume=bool(self.state.lg_is_volume),
                            has_spacing=mrml.volume_geometry(volume) is not None)
        self.state.lg_has_segment = True
        self.state.lg_segment = {
            "name": segment.GetName(), "color": color, "voxels": voxels,
            "sha256": hashlib.sha256(binary.tobytes()).hexdigest(),
            "text": f"Segment '{segment.GetName()}': {size}",
            "stem": f"{self._image_name}-{segment.GetName()}".replace(" ", "_"),
        }

    # Downloads ------------------------------------------------------------------------------------------------

    async def _download(self, fmt: str) -> Any:
        """The segment as a file (written in the private folder, read, removed), or None with a message."""
        node = self.parameters.outputSegmentation
        result = self.controller.last_result
        if node is None or result is None or fmt not in DOWNLOADS:
            return None
        mask = mrml.segment_mask(node, result.segment_id, self.parameters.inputVolume)
        segment = node.GetSegmentation().GetSegment(result.segment_id)
        folder = self._uploads.new_folder()
        target = folder / f"segment{DOWNLOADS[fmt]}"
        try:
            write_mask(mask.reshape(spatial_shape(self._image)), self._image, target,
                       segment_name=segment.GetName(), color=tuple(segment.GetColor()))
            return self.server.protocol.addAttachment(target.read_bytes())
        except LgsegError as exc:
            self._show_error(str(exc))
            return None
        finally:
            target.unlink(missing_ok=True)
            folder.rmdir()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, LgsegError):
        return " ".join(str(exc).split())
    return f"unexpected {exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
