// Starts Swagger UI on /api/v1/docs (kiln.api.docs). A separate file, because the page's
// Content-Security-Policy runs no inline script.
(function () {
  "use strict";
  const root = document.getElementById("swagger-ui");
  window.SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null, // never send the description to an outside validator
  });
})();
