"""Helpers over grafana-foundation-sdk: units, queries, the panel kinds rackscope uses, and a
dashboard builder that numbers panels and query refIds so the generated JSON is stable."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from typing import Any, Protocol, Self, cast

from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

# Grafana unit ids. The "si:" custom units scale with SI prefixes (1.10 Mtok/s); the rest are
# Grafana's built-in ids.
TOKENS_PER_S = "si:tok/s"
TOKENS_PER_J = "si:tok/J"
REQUESTS_PER_S = "reqps"
WATTS = "watt"
KILOWATTS = "kwatt"
KILOWATT_HOURS = "kwatth"
BYTES = "bytes"
BYTES_PER_S = "Bps"
SECONDS = "s"
CELSIUS = "celsius"
HERTZ = "hertz"
PERCENT_UNIT = "percentunit"
COUNT = "short"
NONE = "none"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PROMETHEUS_TYPE = "prometheus"


class Query:
    """A PromQL target: instant queries feed stats and bar gauges, ranges feed graphs."""

    def __init__(self, expr: str, legend: str = "", instant: bool = False, table_format: bool = False) -> None:
        self.expr, self.legend, self.instant, self.table_format = expr, legend, instant, table_format

    def build(self, ref_id: str) -> prom.Dataquery:
        q = prom.Dataquery().expr(self.expr).ref_id(ref_id).datasource(DATASOURCE)
        if self.legend:
            q = q.legend_format(self.legend)
        q = q.instant() if self.instant else q.range()
        if self.table_format:
            q = q.format(pm.PromQueryFormat.TABLE)
        return q


class PanelBuilder(Protocol):
    """The methods every SDK panel builder has that ``Board.add`` relies on."""

    def id(self, id_val: int) -> Self: ...
    def title(self, title: str) -> Self: ...
    def description(self, description: str) -> Self: ...
    def datasource(self, datasource: dm.DataSourceRef) -> Self: ...
    def with_target(self, target: cogbuilder.Builder[Any]) -> Self: ...
    def span(self, w: int) -> Self: ...
    def height(self, h: int) -> Self: ...
    def unit(self, unit: str) -> Self: ...
    def build(self) -> dm.Panel: ...


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    """Absolute thresholds: (None, base color) first, then (value, color) upwards."""
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def reduce_last() -> Any:
    from grafana_foundation_sdk.builders import common as cb

    return cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def stat_panel(color_mode: common.BigValueColorMode = common.BigValueColorMode.VALUE,
               graph: bool = True) -> stat.Panel:
    return (
        stat.Panel()
        .reduce_options(reduce_last())
        .color_mode(color_mode)
        .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.AUTO)
    )


def graph_panel(stacked: bool = False) -> timeseries.Panel:
    from grafana_foundation_sdk.builders import common as cb

    p = (
        timeseries.Panel()
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM))
        .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if stacked:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    return p


def dashed(name_regex: str) -> tuple[str, list[dm.DynamicConfigValue]]:
    """Override drawing matching series as a dashed, unfilled line (baselines, limits)."""
    return name_regex, [
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
    ]


def negative_y(name_regex: str) -> tuple[str, list[dm.DynamicConfigValue]]:
    """Override drawing matching series below the axis (receive under transmit)."""
    return name_regex, [dm.DynamicConfigValue(id_val="custom.transform", value="negative-Y")]


def bar_gauge_panel() -> bargauge.Panel:
    return (
        bargauge.Panel()
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .orientation(common.VizOrientation.HORIZONTAL)
        .reduce_options(reduce_last())
        .show_unfilled(True)
        .min_viz_height(10)
    )


def table_panel() -> table.Panel:
    return table.Panel()


def state_panel() -> statetimeline.Panel:
    return statetimeline.Panel().show_value(common.VisibilityMode.NEVER).merge_values(True).row_height(0.8)


def label_values(selector: str, label: str) -> str:
    return f"label_values({selector}, {label})"


class _PromAnnotation(dm.AnnotationQuery):
    """A Prometheus annotation: the SDK model lacks the title/text/tag fields Grafana reads."""

    def __init__(self, *, title_format: str, text_format: str, tag_keys: str, step: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.title_format, self.text_format, self.tag_keys, self.step = title_format, text_format, tag_keys, step

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update(titleFormat=self.title_format, textFormat=self.text_format, tagKeys=self.tag_keys,
                       step=self.step, useValueForTime=False)
        return payload


class PromAnnotation(cogbuilder.Builder[dm.AnnotationQuery]):
    def __init__(self, name: str, expr: str, color: str, title: str, text_format: str, tag_keys: str,
                 step: str = "15s") -> None:
        self._internal = _PromAnnotation(
            name=name, datasource=DATASOURCE, enable=True, hide=False, icon_color=color, expr=expr,
            title_format=title, text_format=text_format, tag_keys=tag_keys, step=step,
        )

    def build(self) -> dm.AnnotationQuery:
        return self._internal


class Board:
    """A dashboard under construction: panels get sequential ids and refIds A, B, C...;
    every panel must be given a unit."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self._next_id = 1
        self.dashboard = (
            db.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["rackscope"])
            .time("now-30m", "now")
            .refresh("10s")
            .timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .readonly()
            .link(db.DashboardLink("rackscope").type(dm.DashboardLinkType.DASHBOARDS).tags(["rackscope"])
                  .as_dropdown(True).include_vars(True).keep_time(True))
            .with_variable(db.DatasourceVariable("datasource").label("Data source").type(PROMETHEUS_TYPE))
        )

    def variable(self, name: str, label: str, query: str, multi: bool = True, include_all: bool = True,
                 hide: bool = False) -> Board:
        v = (
            db.QueryVariable(name)
            .label(label)
            .query(query)
            .datasource(DATASOURCE)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NATURAL_ASC)
            .multi(multi)
            .include_all(include_all)
        )
        if include_all:
            v = v.all_value(".*")
        if hide:
            v = v.hide(dm.VariableHide.HIDE_VARIABLE)
        self.dashboard = self.dashboard.with_variable(v)
        return self

    def annotation(self, a: PromAnnotation) -> Board:
        self.dashboard = self.dashboard.annotation(a)
        return self

    def row(self, title: str) -> Board:
        self.dashboard = self.dashboard.with_row(db.Row(title).id(self._take_id()))
        return self

    def add(self, panel: PanelBuilder, title: str, unit: str, description: str, queries: Sequence[Query],
            w: int = 12, h: int = 8) -> Board:
        p = panel.id(self._take_id()).title(title).description(description).unit(unit).span(w).height(h)
        if queries:
            p = p.datasource(DATASOURCE)
        for ref, q in zip(string.ascii_uppercase, queries, strict=False):
            p = p.with_target(q.build(ref))
        # Every SDK panel builder is a Builder[Panel]; the protocol only names the methods used above.
        self.dashboard = self.dashboard.with_panel(cast(cogbuilder.Builder[dm.Panel], p))
        return self

    def _take_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(json.dumps(self.dashboard.build(), cls=JSONEncoder))
        return data
