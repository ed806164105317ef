"""A Dash app (Flask underneath, callbacks over HTTP from the browser's React front end)."""

import os

from dash import Dash, Input, Output, dcc, html

app = Dash(__name__)
app.layout = html.Div(
    [
        html.H1("Dash on Kiln"),
        dcc.Input(id="name", value="Kiln", type="text"),
        html.Div(id="greeting"),
    ]
)


@app.callback(Output("greeting", "children"), Input("name", "value"))
def greet(name: str) -> str:
    return f"Hello from a callback, {name}!"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["CDSW_APP_PORT"]), debug=False)
