// `/`: the search box over every stream.
"use strict";

setupSearch(null);
