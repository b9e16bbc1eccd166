# Shared by the fixture scripts here: exact numbers in JSON, and the folder a script runs from.
#
# jsonlite prints at most 15 significant digits (even with digits = NA or I(17)), so numbers are
# formatted here with the shortest "%.{15,16,17}g" form that reads back to the identical double and
# inserted verbatim. Length-1 vectors become scalars unless wrapped in I().
num_str <- function(v) vapply(v, function(x) {
  if (is.na(x)) return("null")
  for (d in 15:17) if (as.numeric(s <- sprintf("%.*g", d, x)) == x) break
  s
}, "")
json_array <- function(items) paste0("[", paste(items, collapse = ", "), "]")
exact_numbers <- function(x) {
  if (is.list(x)) return(structure(lapply(x, exact_numbers), names = names(x)))
  if (!is.numeric(x)) return(x)
  txt <- if (is.matrix(x)) json_array(apply(x, 1, function(row) json_array(num_str(row))))
         else if (length(x) == 1 && !inherits(x, "AsIs")) num_str(x)
         else json_array(num_str(x))
  structure(txt, class = "json")
}

# The directory of the script Rscript is running (the default output folder).
script_dir <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  dirname(normalizePath(sub("^--file=", "", file_arg)))
}
